"""The verbs of ``habanero-pack``: each one's arguments, and the thin handler that runs it.

Handlers parse nothing and decide little: they resolve where to go (``packer.target``), call the
public functions that do the work (``packer.deploy``, ``packer.watch``, ``packer.build``,
``overlay.keys``) and print the result (``packer.output``). Each imports what it needs when it runs,
so ``habanero-pack --help`` and ``--version`` load none of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .args import APP_ID, CA_FILE, JSON, KEY, PACKAGES, PROG, PROJECT, URL, Argument, UsageError, arg, positive_int

__all__ = ["VERBS", "Verb"]

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Verb:
    name: str
    run: Handler
    help: str
    arguments: tuple[Argument, ...]


def _emit(args: argparse.Namespace, text: str) -> None:
    """Print a command's result, unless ``-q`` asked for errors only."""
    if getattr(args, "quiet", 0) <= 0:
        print(_printable(text), flush=True)


def _printable(text: str) -> str:
    from .output import printable

    return printable(text)


def _emit_json(args: argparse.Namespace, data: Any) -> None:
    _emit(args, json.dumps(data, indent=2))


# ------------------------------------------------------------------------------------- push


def _push(args: argparse.Namespace) -> int:
    from .target import open_remote, resolve

    if not args.watch and (args.check is not None or args.debounce is not None):
        raise UsageError("--check and --debounce go with --watch: habanero-pack push --watch --check CMD")
    if args.watch and args.force:
        raise UsageError("--force goes with a single push, not --watch (watch mode builds on the version "
                         "the app runs, whoever pushed it)")
    target = resolve(args, need_project=True)
    assert target.config is not None
    if args.watch and _is_channel(target.url):
        raise UsageError("--watch pushes to one app over HTTP; push a fleet through its channel one push at a time")
    if args.watch and args.wait_permanent:
        raise UsageError("--wait-permanent goes with a single push, not --watch")
    if args.watch:
        from .watch import DEBOUNCE_MS, WatchSession

        out = (lambda line: None) if getattr(args, "quiet", 0) > 0 else None
        from .client import Remote

        remote = open_remote(target)
        assert isinstance(remote, Remote)  # a channel was refused above
        session = WatchSession(remote, target.config, check=args.check,
                               debounce_ms=args.debounce or DEBOUNCE_MS, out=out)
        return session.run()
    from overlay.errors import RemoteError

    from .deploy import BaseCache, push_once
    from .output import describe_failure, describe_push, failure_json, push_json

    with open_remote(target) as remote:
        try:
            result = push_once(remote, target.config, bases=BaseCache(target.config.root), force=args.force)
        except RemoteError as exc:
            if not exc.status or exc.code == "not_habanero":  # one line from main()
                raise
            if args.json:
                _emit_json(args, failure_json(exc, target.root, remote.store))
            print(f"{PROG}: push refused: {_printable(describe_failure(exc, target.root, remote.store))}",
                  file=sys.stderr)
            print(f"{PROG}: the app still serves its previous version", file=sys.stderr)
            return 1
        if args.json:
            _emit_json(args, push_json(result))
        else:
            _emit(args, describe_push(result))
        if args.wait_permanent:
            return _wait_permanent(args, remote, result.version)
    return 0


#: Seconds ``--wait-permanent`` waits for a verdict once its version is no longer active.
VERDICT_GRACE = 3.0


def _wait_permanent(args: argparse.Namespace, remote: Any, version: int) -> int:
    """Wait for probation's verdict on ``version`` (see ``overlay.runtime.probation``): 0 when it
    is permanent, 1 when it was reverted (the reason on stderr)."""
    started, replaced = time.monotonic(), 0.0
    while True:
        status = remote.status()
        probation = status.get("probation") or {}
        window = float(probation.get("window_s") or 0)
        if not window and not probation:
            _emit(args, f"v{version} is permanent: the app keeps no probation (install(probation=...))")
            return 0
        state = probation.get("state") if probation.get("version") == version else None
        if state == "permanent":
            _emit(args, f"v{version} is permanent: it passed its probation")
            return 0
        if state in ("reverted", "failed"):
            print(f"{PROG}: v{version} {state}: {_printable(str(probation.get('reason', '')))}", file=sys.stderr)
            return 1
        active = (status.get("active") or {}).get("version")
        if state is None and active != version:
            # A revert commits the old version a moment before it records its verdict: give the
            # verdict that moment before concluding another deploy replaced the version.
            replaced = replaced or time.monotonic()
            if time.monotonic() - replaced > VERDICT_GRACE:
                print(f"{PROG}: v{version} is no longer active (v{active} is); it was replaced before its verdict",
                      file=sys.stderr)
                return 1
        else:
            replaced = 0.0
        if time.monotonic() - started > 2 * window + 30:
            print(f"{PROG}: no verdict on v{version} within {2 * window + 30:g} s", file=sys.stderr)
            return 1
        time.sleep(min(0.5, max(window / 20, 0.05)))


PUSH_ARGUMENTS: tuple[Argument, ...] = (
    URL,
    arg("--watch", action="store_true",
        help="push again on every save, until Ctrl-C; pushes first when the app runs other code than the project's"),
    arg("--check", metavar="CMD", help="with --watch: run CMD (a shell command, in the project directory) "
        "before each push; when it fails the push is skipped and its output shown"),
    arg("--debounce", type=lambda s: positive_int(s, "--debounce"), metavar="MS",
        help="with --watch: group saves made within MS milliseconds into one push (default 20)"),
    arg("--wait-permanent", action="store_true",
        help="after the push, wait for the app's probation verdict: exit 0 once the version is permanent, "
        "1 if it was reverted (install(probation=..., health=...))"),
    arg("--force", action="store_true",
        help="replace whatever version the app runs, even one pushed or rolled back to since this push "
        "read it (the bundle is signed with no parent; without --force the app refuses it: stale_parent)"),
    JSON, KEY, PROJECT, APP_ID, PACKAGES, CA_FILE,
)


# ------------------------------------------------------------------------ status, history, rollback


def _is_channel(url: str) -> bool:
    from overlay.channel import is_channel_url

    return is_channel_url(url)


def _status(args: argparse.Namespace) -> int:
    from .target import open_remote, resolve

    target = resolve(args, need_project=False)
    with open_remote(target) as remote:
        status = remote.status()
    if args.json:
        _emit_json(args, status)
        return 0
    if _is_channel(target.url):
        from .output import fleet_status

        _emit(args, fleet_status(status))
        return 1 if status.get("behind") or status.get("unanswered") else 0
    active = status.get("active") or {}
    lines = [f"app        {status.get('app_id')} at {target.url} (pid {status.get('pid')}, up "
             f"{status.get('uptime_s', 0):.0f} s)"]
    if active:
        builder = active.get("builder") or {}
        lines.append(f"active     version {active['version']} ({active['digest'][:12]}), {active['entries']} "
                     f"entries, built {active['created']} by {builder.get('user', '?')}@{builder.get('host', '?')}")
    else:
        lines.append("active     none: the app runs the code on disk")
    lines.append(f"highest    {status.get('highest')}")
    for worker in status.get("workers") or []:
        outcome = worker.get("last_outcome") or {}
        last = (f", last {outcome.get('action')} v{outcome.get('version')} {outcome.get('outcome')}"
                if outcome else "")
        lines.append(f"worker     pid {worker.get('pid')}: v{worker.get('version')}, up "
                     f"{max(0.0, time.time() - float(worker.get('started') or time.time())):.0f} s{last}")
    failure = status.get("last_failure")
    if failure:
        lines.append(f"last fail  {failure.get('action')} v{failure.get('version')}: {failure.get('code')}: "
                     f"{failure.get('message')}")
    lines += [f"problem    {problem}" for problem in status.get("startup_problems") or []]
    _emit(args, "\n".join(lines))
    return 0


def _history(args: argparse.Namespace) -> int:
    from .client import map_traceback
    from .target import open_remote, resolve

    target = resolve(args, need_project=False)
    with open_remote(target) as remote:
        entries = remote.history(args.limit)
        if not args.json and target.root and any(e.get("outcome") != "ok" for e in entries):
            remote.status()  # where the app's store is: reasons name files in its tree
    if args.json:
        _emit_json(args, entries)
        return 0
    lines = []
    for e in entries:
        reason = (f"  {e.get('code')}: {map_traceback(str(e.get('reason')), target.root, remote.store)}"
                  if e.get("outcome") != "ok" else "")
        lines.append(f"{e.get('time', '?'):<27} {e.get('action', '?'):<9} v{e.get('version')!s:<5} "
                     f"{e.get('outcome', '?'):<7} {(e.get('digest') or '')[:12]:<12}{reason}")
    _emit(args, "\n".join(lines) if lines else "no deploys yet")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from .target import open_remote, resolve

    target = resolve(args, need_project=False)
    with open_remote(target) as remote:
        before = remote.status()
        expect = (before.get("active") or {}).get("version")
        if expect is None:
            from overlay.errors import ControlRejected

            raise ControlRejected(f"nothing to roll back: {target.url} runs the code on disk (no version was "
                                  "pushed yet)", code="nothing_to_roll_back")
        response = remote.rollback(args.to, expect=expect)
    from .output import worker_lines

    r = response["report"]
    _emit(args, "\n".join([f"rolled back {target.url} from version {r['previous_version']} to {r['version']} in "
                           f"{r['timings_ms'].get('total', 0):.1f} ms", *worker_lines(r.get("workers") or [])]))
    return 0


REMOTE = (CA_FILE, KEY, PROJECT, APP_ID)


# --------------------------------------------------------------------------- build, inspect, keygen


def _build(args: argparse.Namespace) -> int:
    from overlay.keys import load_signing_key

    from .build import build
    from .output import display, size
    from .target import project_config

    config = project_config(args)
    signer = load_signing_key(config.require_key())  # before the work: a passphrase prompt comes first
    built = build(config, version=args.bundle_version, signer=signer)
    out = built.write(args.output or f"{config.app_id}-v{args.bundle_version}.hbn")
    _emit(args, f"wrote {display(out)}: {config.app_id} v{built.version}, {built.entries} entries, "
                f"{size(built.size)} ({size(built.uncompressed_size)} unpacked, ratio {built.ratio:.1f}), "
                f"key {built.key_id}, {built.timings['total']:.0f} ms")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import os

    from overlay.keys import load_trusted_keys

    from .build import inspect_bundle
    from .output import format_inspection, inspection_json

    data = Path(args.file).read_bytes()
    source = args.trusted_keys or os.environ.get("HABANERO_TRUSTED_KEYS", "").strip()
    trusted = load_trusted_keys(source) if source else None
    report = inspect_bundle(data, trusted)
    if args.json:
        _emit_json(args, inspection_json(args.file, report, trusted))
    else:
        _emit(args, format_inspection(args.file, report, trusted))
    if report.refusal is not None:
        print(f"{PROG}: error: {report.refusal.code}: {_printable(' '.join(report.refusal.message.split()))}",
              file=sys.stderr)
        return 1
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from overlay.keys import generate_signing_key

    from .config import PROJECT_KEY
    from .output import display

    default = _keygen_home(args.project) / PROJECT_KEY
    path = Path(args.out).expanduser().absolute() if args.out else default
    key = generate_signing_key(path, comment=args.comment or _user_at_host(), overwrite=args.force)
    shown = display(path)
    lines = [f"wrote {shown} (private key, mode 0600) and {shown}.pub", f"key id {key.key_id}", key.public.line(),
             "",
             "Add the ssh-ed25519 line above to the app's trusted keys file (what the running app passes to "
             "overlay.install() as trusted_keys=, or HABANERO_TRUSTED_KEYS), e.g.",
             f"  cat {shown}.pub >> path/to/trusted_keys"]
    if path == default:
        lines.append("habanero-pack signs with it in this project unless --key, HABANERO_KEY or `key` in "
                     "[tool.habanero] names another. Keep the private key out of version control.")
    else:
        lines.append(f"To sign with it, set key = \"{shown}\" in [tool.habanero] or HABANERO_KEY={shown}. "
                     "Keep the private key out of version control.")
    _emit(args, "\n".join(lines))
    return 0


def _keygen_home(project: str | None) -> Path:
    """The project root when there is one (``--project`` or a pyproject above), else the cwd."""
    from overlay.errors import ConfigError

    from .config import find_project

    try:
        return find_project(project)
    except ConfigError:
        if project is not None:
            raise
        return Path.cwd()


def _user_at_host() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "habanero"
    return f"{user}@{socket.gethostname()}"


#: Every verb, in the order ``--help`` lists them.
VERBS: dict[str, Verb] = {verb.name: verb for verb in (
    Verb("push", _push, "build, sign and deploy the project to the running app (--watch: on every save)",
         PUSH_ARGUMENTS),
    Verb("status", _status, "show the version a running app serves", (URL, JSON, *REMOTE)),
    Verb("history", _history, "show a running app's deploy history",
         (URL, JSON, *REMOTE, arg("--limit", type=int, default=20, help="how many entries (default 20)"))),
    Verb("rollback", _rollback, "return a running app to its previous version",
         (URL, *REMOTE, arg("--to", type=int, metavar="VERSION", help="roll back to this stored version "
                            "(default: the one before the active version)"))),
    Verb("build", _build, "build a signed bundle of the project's packages, without pushing", (
        arg("-o", "--output", metavar="FILE", help="where to write the bundle (default: APP_ID-vN.hbn)"),
        arg("--bundle-version", type=lambda s: positive_int(s, "--bundle-version"), default=1, metavar="N",
            help="the bundle's version, higher than any the app accepted (default: 1)"),
        KEY, PROJECT, APP_ID, PACKAGES)),
    Verb("inspect", _inspect, "show a bundle's manifest and check its signature", (
        arg("file", metavar="FILE", help="a bundle file"),
        arg("--trusted-keys", metavar="FILE",
            help="verify against this authorized_keys-style file (default: HABANERO_TRUSTED_KEYS)"),
        JSON)),
    Verb("keygen", _keygen, "create a deploy key pair (OpenSSH ed25519)", (
        arg("--out", metavar="PATH", help="private key path; the public key goes to PATH.pub "
            "(default: .habanero/deploy_key in the project)"),
        arg("--comment", metavar="TEXT", help="comment on the public key line (default: user@host)"),
        arg("--force", action="store_true", help="overwrite an existing key pair"),
        PROJECT)),
)}
