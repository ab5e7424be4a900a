"""Run every benchmark, each in its own interpreter, and write the tables to bench/results/latest.md.

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
]


def main() -> int:
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
