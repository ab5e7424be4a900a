"""Run every benchmark, each in its own interpreter, and write the tables down.

The tables go to ``bench/results/latest.md`` (kept out of git) and into ``docs/performance.md``,
between its ``<!-- bench:start -->`` and ``<!-- bench:end -->`` marks: the narrative around them is
written by hand, the figures are always the last run's. ``--no-docs`` leaves the docs alone.

Figures are printed, never asserted: absolute times on shared machines are noisy, so each table
quotes the ratios it measured side by side in one run.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITES = [
    ("Bundle build and verify", "bench_build.py"),
    ("Import: overlay vs filesystem", "bench_import.py"),
    ("Live upgrade: rebinding in place", "bench_rebind.py"),
    ("Live upgrade: the whole transaction vs reload and autoreload", "bench_upgrade.py"),
    ("Push: habanero-pack --push end to end", "bench_push.py"),
    ("Save to live: watch mode vs restart", "bench_watch.py"),
    ("Every worker: gunicorn -w 4, push vs kill -HUP, and memory", "bench_workers.py"),
    ("A fleet through Redis: 12 members in 3 stores", "bench_fleet.py"),
    ("Request gate: latency at 200 requests/s while pushing, gate on vs off", "bench_gate.py"),
]
DOCS = HERE.parent / "docs" / "performance.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def main(argv: list[str]) -> int:
    out = [f"# habanero benchmarks, {datetime.datetime.now():%Y-%m-%d %H:%M}",
           f"Python {platform.python_version()} on {platform.machine()}, {platform.system()}", ""]
    failed = 0
    for title, script in SUITES:
        path = HERE / script
        print(f"\n## {title}", flush=True)
        out.append(f"## {title}\n")
        if not path.exists():
            note = f"_{script} is not written yet._"
            print(note)
            out.append(note + "\n")
            continue
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True)
        print(proc.stdout, end="")
        out.append(proc.stdout)
        if proc.returncode:
            failed += 1
            print(proc.stderr[-3000:], file=sys.stderr)
            out.append(f"_failed with exit code {proc.returncode}_\n")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "latest.md").write_text("\n".join(out) + "\n", encoding="utf-8")
    print(f"\nwrote {results / 'latest.md'}")
    if "--no-docs" not in argv and not failed:
        _write_docs("\n".join(out))
    return 1 if failed else 0


def _write_docs(tables: str) -> None:
    """Put the run's tables between the marks in docs/performance.md (headings one level down)."""
    text = DOCS.read_text(encoding="utf-8")
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        print(f"{DOCS} lacks the {START} and {END} marks; left as it is", file=sys.stderr)
        return
    body = "\n".join("#" + line if line.startswith("#") else line for line in tables.strip().splitlines())
    DOCS.write_text(f"{head}{START}\n{body}\n{END}{tail}", encoding="utf-8")
    print(f"wrote {DOCS}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
