"""Bundle build and verify: time, size and compression ratio.

Inputs: (a) a generated project of 1,000 modules (20 packages of 50 modules, ~50 lines each, with
functions and classes) and (b) real code none of us wrote: copies of the standard library's
``asyncio``, ``email`` and ``json`` packages. For each, the median of several runs of:

- build, cold: what ``habanero-pack build`` does after loading the key: read every file, git
  metadata, hash, compress, sign;
- build, warm: what watch mode does per save: refresh a snapshot (stat every file, read none) and
  build with cached metadata;
- verify+open: ``open_bundle``, as the server does (signature, manifest, bounded decompression,
  every entry's hash).

Run ``.venv/bin/python bench/bench_build.py``; it prints a markdown table. ``run()`` returns the rows.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from overlay.bundle import open_bundle
from overlay.keys import TrustedKeys, generate_signing_key
from packer.build import build, builder_info
from packer.collect import SourceSnapshot
from packer.config import load_config

RUNS = 9
STDLIB_PACKAGES = ("asyncio", "email", "json")
TARGETS = "targets: 1,000-module build < 300 ms, verify+open < 100 ms, ratio >= 4 on real source"


def run(runs: int = RUNS) -> list[dict]:
    """Measure both inputs; one dict per input with times in milliseconds and sizes in bytes."""
    with tempfile.TemporaryDirectory(prefix="habanero-bench-") as tmp:
        tmp_path = Path(tmp)
        key = generate_signing_key(tmp_path / "key", comment="bench")
        trusted = TrustedKeys([key.public])
        rows = []
        for label, make in (("synthetic: 20 packages x 50 modules", _synthetic),
                            ("stdlib: asyncio + email + json", _stdlib)):
            root = make(tmp_path / label.split(":")[0])
            rows.append({"input": label, **_measure(root, key, trusted, runs)})
        return rows


def _measure(root: Path, key, trusted: TrustedKeys, runs: int) -> dict:
    config = load_config(root)
    cold = _median(runs, lambda: build(config, version=1, signer=key))
    snapshot = SourceSnapshot(config)
    snapshot.refresh()
    meta = builder_info(root)

    def warm():
        snapshot.refresh()
        return build(config, version=1, signer=key, snapshot=snapshot, builder=meta)

    warm_ms = _median(runs, warm)
    built = warm()
    verify = _median(runs, lambda: open_bundle(built.data, trusted, app_id=config.app_id))
    return {
        "files": built.entries,
        "build_cold_ms": cold,
        "build_warm_ms": warm_ms,
        "verify_open_ms": verify,
        "bundle_bytes": built.size,
        "uncompressed_bytes": built.uncompressed_size,
        "ratio": built.uncompressed_size / built.size,
    }


def _median(runs: int, fn: Callable[[], object]) -> float:
    fn()  # warm-up: imports, page cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


# ------------------------------------------------------------------------------------- inputs


def _pyproject(root: Path, app_id: str, packages: tuple[str, ...]) -> None:
    listed = ", ".join(f'"{p}"' for p in packages)
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "{app_id}"\n\n[tool.habanero]\napp_id = "{app_id}"\npackages = [{listed}]\n')


def _stdlib(root: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root.mkdir()
    for name in STDLIB_PACKAGES:
        # copy2 keeps mtimes, so the files are as old as the installed Python
        shutil.copytree(stdlib / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    _pyproject(root, "stdlib-sample", STDLIB_PACKAGES)
    return root


_WORDS = ("order", "cart", "user", "price", "item", "stock", "invoice", "payment", "session", "token",
          "report", "queue", "event", "record", "cache", "account", "address", "ticket", "batch", "rate")


def _synthetic(root: Path, packages: int = 20, modules: int = 50) -> Path:
    rng = random.Random(1000)
    names = []
    for p in range(packages):
        package = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}_{p}"
        names.append(package)
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(f'"""The {package} package."""\n')
        for m in range(modules):
            (root / package / f"m{m:02d}_{rng.choice(_WORDS)}.py").write_text(_module(rng, package, m))
    _pyproject(root, "synthetic", tuple(names))
    # As in a real checkout, the files predate this run (the snapshot re-reads files < 2 s old).
    past = time.time() - 3600
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            os.utime(os.path.join(dirpath, filename), (past, past))
    return root


def _module(rng: random.Random, package: str, index: int) -> str:
    """A ~50-line module: imports, constants, two functions and a class with three methods."""
    w = lambda: rng.choice(_WORDS)  # noqa: E731
    a, b, c, d = w(), w(), w(), w()
    cls = f"{a.title()}{b.title()}{index}"
    limit, scale = rng.randint(2, 500), round(rng.uniform(0.5, 9.5), 2)
    return f'''"""{a.title()} and {b} handling for {package} ({index})."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_{a.upper()}S = {limit}
{b.upper()}_SCALE = {scale}


def load_{a}_{index}(raw: dict, *, strict: bool = False) -> dict:
    """Normalise a {a} record read from the {c} service."""
    out = {{k.strip().lower(): v for k, v in raw.items() if v is not None}}
    if strict and "{d}" not in out:
        raise ValueError("{a} record without {d}: %r" % (raw,))
    out.setdefault("{b}", {rng.randint(0, 99)})
    return out


def {b}_total_{index}(items: list[dict]) -> float:
    total = 0.0
    for item in items[:MAX_{a.upper()}S]:
        total += float(item.get("{c}", 0)) * {b.upper()}_SCALE
    log.debug("{b} total for %d items: %.2f", len(items), total)
    return round(total, {rng.randint(0, 4)})


@dataclass
class {cls}:
    """A {a} with its {b}s and {c} history."""

    name: str
    {b}s: list[float] = field(default_factory=list)
    {c}_count: int = 0

    def add_{b}(self, value: float) -> None:
        if len(self.{b}s) >= MAX_{a.upper()}S:
            raise OverflowError("too many {b}s for " + self.name)
        self.{b}s.append(value)

    def {d}_ratio(self) -> float:
        return sum(self.{b}s) / max(1, self.{c}_count)

    def describe(self) -> str:
        return f"{{self.name}}: {{len(self.{b}s)}} {b}s, ratio {{self.{d}_ratio():.{rng.randint(1, 3)}f}}"
'''


# ------------------------------------------------------------------------------------- report


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB"


def table(rows: list[dict]) -> str:
    lines = ["| input | files | build cold | build warm | verify+open | bundle | unpacked | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['input']} | {r['files']} | {r['build_cold_ms']:.1f} ms | "
                     f"{r['build_warm_ms']:.1f} ms | {r['verify_open_ms']:.1f} ms | "
                     f"{_kib(r['bundle_bytes'])} | {_kib(r['uncompressed_bytes'])} | {r['ratio']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    # The stdlib copies earn a "standard library name" warning from packer.config; expected here.
    logging.getLogger("packer.config").setLevel(logging.ERROR)
    rows = run()
    print(table(rows))
    print(f"\nMedian of {RUNS} runs, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs. {TARGETS}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
