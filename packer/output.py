"""What habanero-pack prints: push summaries, refusals, bundle inspections, sizes and paths.

Formatting only: nothing here talks to an app or reads a project.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overlay.errors import HabaneroError
from overlay.errors import printable as _printable

from .client import map_traceback

if TYPE_CHECKING:
    from overlay.keys import TrustedKeys

    from .build import Inspection
    from .deploy import PushResult

__all__ = ["printable", "describe_failure", "describe_push", "display", "failure_json", "format_inspection",
           "fleet_status", "inspection_json", "push_json", "size", "worker_lines"]


def printable(text: str) -> str:
    """``text`` safe for a terminal, newlines and tabs kept: what the CLI prints comes partly from
    the app, and so from the network (key ids, messages, tracebacks, history)."""
    return _printable(text, limit=None, keep="\n\t")


def describe_push(result: PushResult) -> str:
    """One readable summary of a push: version, what changed, what was patched, and timings; and,
    in capitals so that it is not missed, every change that did not take effect live."""
    if not result.pushed:
        return (f"nothing to push: {result.url} runs this code already (version {result.version}, "
                f"{result.digest[:12]}); no version number was spent")
    r = result.report
    t = result.timings_ms
    kind = "delta" if result.delta else "full"
    lines = [f"pushed version {r['version']} to {result.url} ({result.digest[:12]}, {result.bytes_sent} bytes "
             f"{kind}) in "
             f"{t['total']:.0f} ms: build {t['build']:.0f}, transfer {t['transfer']:.0f}, server "
             f"{t['server']:.1f} (verify {r['timings_ms'].get('verify', 0):.1f}, apply "
             f"{r['timings_ms'].get('apply', 0):.1f})"]
    lines += worker_lines(r.get("workers") or [])
    lines += [f"  {label.replace('_', ' ')}: {', '.join(r[label])}"
              for label in ("changed", "added", "removed", "data_changed") if r.get(label)]
    for module in r.get("modules", []):
        name = module["module"]
        if module.get("patched"):
            lines.append(f"  patched in {name}: {', '.join(module['patched'])}")
        lines += [f"  replaced {name}.{what}: {reason}" for what, reason in module.get("replaced", [])]
        lines += [f"  removed {name}.{what}" for what in module.get("removed", [])]
        lines += [f"  note ({name}): {note}" for note in module.get("notes", [])]
    for notice in r.get("not_live") or []:
        lines.append(f"  NOT LIVE ({notice.get('source', '?')}): {notice.get('what', '')}; {notice.get('fix', '')}")
    if not any(r.get(k) for k in ("changed", "added", "removed", "data_changed")):
        lines.append("  nothing changed in the code; the version number moved on")
    return "\n".join(lines)


def worker_lines(workers: list[Any]) -> list[str]:
    """One line per process of the app: pid, version, outcome, milliseconds, and why when it failed."""
    lines = []
    for w in workers:
        if not isinstance(w, dict):
            continue  # an answer from another program, not a worker line
        version = f"v{w['version']}" if w.get("version") is not None else "-"
        ms = f"{w['ms']:.1f} ms" if isinstance(w.get("ms"), (int, float)) else "-"
        reason = f"  {w['reason']}" if w.get("reason") else ""
        where = f"{w['host']} " if w.get("host") else ""  # a fleet's member: its machine first
        lines.append(f"  worker {where}{w.get('pid', '?')!s:<7} {version:<6} {w.get('outcome', '?'):<9} {ms}{reason}")
    return lines


def fleet_status(status: dict[str, Any]) -> str:
    """A fleet's status: its version, each store, each member (host, pid, version), and who is behind."""
    fleet = status.get("fleet") or {}
    lines = [f"fleet      {status.get('app_id')} through {status.get('channel')}: "
             f"{len(status.get('members') or [])} live members in {len(status.get('stores') or [])} stores",
             f"active     version {fleet.get('version')} ({(fleet.get('digest') or '')[:12]})" if fleet
             else "active     none pushed through the channel yet", f"highest    {status.get('highest')}"]
    behind = status.get("behind") or []
    lines += [f"store      {s.get('where')}: v{s.get('active')}, highest {s.get('highest')}"
              for s in status.get("stores") or []]
    lines += [f"member     {w.get('host')} pid {w.get('pid')}: v{w.get('version')}"
              for w in status.get("workers") or []]
    lines += [f"BEHIND     {m.get('host')} pid {m.get('pid')}: v{m.get('version')}"
              f"{'  ' + str(m['behind']) if m.get('behind') else ''}" for m in behind]
    lines += [f"silent     {m.get('host')} pid {m.get('pid')}: last heard on v{m.get('version')}"
              for m in status.get("silent") or []]
    lines += [f"no answer  {m.get('host')} pid {m.get('pid')} (its store's member did not list it)"
              for m in status.get("unanswered") or []]
    if not behind:
        lines.append("every live member runs the newest version")
    return "\n".join(lines)


def push_json(result: PushResult) -> dict[str, Any]:
    """The push's result for scripts and benchmarks: client timings plus the server's report."""
    return {"ok": True, "pushed": result.pushed, "version": result.version, "digest": result.digest,
            "url": result.url, "bytes": result.bytes_sent, "delta": result.delta, "timings_ms": result.timings_ms,
            "report": result.report if result.pushed else None}


def _workers(exc: HabaneroError) -> list[Any]:
    """The per-worker lines an app's refusal carries (``RemoteError.body["workers"]``), if any."""
    body = getattr(exc, "body", None)
    workers = body.get("workers") if isinstance(body, dict) else None
    return workers if isinstance(workers, list) else []


def failure_json(exc: HabaneroError, project_root: str | None, store: str | None = None) -> dict[str, Any]:
    return {"ok": False, "code": exc.code, "message": map_traceback(exc.message, project_root, store),
            "remote_traceback": map_traceback(getattr(exc, "remote_traceback", ""), project_root, store),
            "workers": _workers(exc)}


def describe_failure(exc: HabaneroError, project_root: str | None, store: str | None = None) -> str:
    """The server's reason, and its traceback mapped onto the developer's files.

    ``store`` is the app's store directory (its status says it): paths in its tree are mapped,
    when there is a project to map them to (``project_root``).
    """
    text = f"{exc.code}: {map_traceback(exc.message, project_root, store)}"
    if workers := _workers(exc):
        text += "\n" + "\n".join(worker_lines(workers))
    remote_tb = getattr(exc, "remote_traceback", "")
    if remote_tb:
        mapped = " (paths mapped to this project)" if project_root else ""
        text += f"\n--- traceback in the app{mapped} ---\n"
        text += map_traceback(remote_tb, project_root, store).rstrip()
    return text


def format_inspection(file: str, report: Inspection, trusted: TrustedKeys | None) -> str:
    m, payload = report.manifest, report.manifest["payload"]
    entries = m["entries"]
    kinds = {k: sum(e["kind"] == k for e in entries) for k in ("package", "module", "data")}
    ratio = payload["uncompressed_size"] / payload["size"] if payload["size"] else 0.0
    lines = [
        f"file       {file} ({size(report.size)})",
        f"app        {m['app_id']}",
        f"version    {m['version']}",
        f"parent     {m['parent'] or 'none'}",
        f"digest     {report.digest}",
        f"created    {m['created']}",
        f"builder    {_describe_builder(m['builder'])}",
        f"payload    {payload['codec']}, {size(payload['size'])}, {size(payload['uncompressed_size'])} "
        f"unpacked (ratio {ratio:.1f})",
        f"signature  {_verdict(report, trusted)}",
        f"entries    {len(entries)}: {kinds['package']} packages, {kinds['module']} modules, "
        f"{kinds['data']} data files",
    ]
    width = max([4] + [len(size(e["size"])) for e in entries])
    lines.append(f"  {'KIND':<8} {'SIZE':>{width}}  NAME")
    lines += [f"  {e['kind']:<8} {size(e['size']):>{width}}  {e['name']}" for e in entries]
    return "\n".join(lines)


def _describe_builder(builder: dict[str, Any]) -> str:
    who = "@".join(str(builder[k]) for k in ("user", "host") if builder.get(k)) or "unknown"
    commit = builder.get("git_commit")
    git = f"git {commit[:12]}{' (dirty)' if builder.get('git_dirty') else ''}" if commit else "not from git"
    return f"{who}, {git}, habanero {builder.get('habanero', '?')}"


def _verdict(report: Inspection, trusted: TrustedKeys | None) -> str:
    if not report.checked or trusted is None:
        return f"not checked: pass --trusted-keys FILE (claims {', '.join(report.claimed_key_ids)})"
    if report.refusal is not None:
        return f"REFUSED {report.refusal.code}: {report.refusal.message}"
    comments = {kid: getattr(trusted.get(kid), "comment", "") for kid in report.verified_by}
    named = [f"{kid} ({comments[kid]})" if comments[kid] else kid for kid in report.verified_by]
    return f"verified with {', '.join(named)}, trusted in {trusted.source}"


def inspection_json(file: str, report: Inspection, trusted: TrustedKeys | None) -> dict[str, Any]:
    refusal = report.refusal
    return {
        "file": file,
        "size": report.size,
        "digest": report.digest,
        "signature": {
            "checked": report.checked,
            "verified": report.verified,
            "verified_by": list(report.verified_by),
            "claimed_key_ids": list(report.claimed_key_ids),
            "trusted_keys": trusted.source if trusted is not None else None,
            "refusal": None if refusal is None else {"code": refusal.code, "message": refusal.message},
        },
        "manifest": report.manifest,
    }


def display(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the cwd when it is below it, for messages."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def size(n: int) -> str:
    """``512 B``, ``3.4 KiB``, ``1.2 MiB``."""
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / (1024 * 1024):.1f} MiB"
