"""``Overlay.apply`` of a one-function change in a 1,000-module app, against reload, IPython's autoreload and jurigged.

The app is bench_build's synthetic project (20 packages x 50 modules of ~50 lines: imports,
constants, two functions, a dataclass), of which 100 modules (spread over the packages) are
replaced by bench_rebind's 200-function module (1,859 lines, classes, closure factories), served
from a real store by ``overlay.install()`` and fully imported, plus one module that holds the app's
live objects (tuples and lists the collector tracks: 0, 1M or 3M of them). Each push changes one
line of one function in 1, 10 or 100 modules, either 200-function modules (the headline: the size
the peers' figures in the issue were measured on) or 50-line ones. Server side only: every bundle
is built and signed before the clock starts, and the clock runs around ``ov.apply(bundle)``; its
``report.timings_ms`` splits the time into phases. The store runs with its default
``sync="background"``; one row repeats the headline with ``sync="commit"`` (fsync before answering).

Side by side, in the same process and heap, on a copy of the app imported from disk: the same
change applied with ``importlib.reload``, IPython's ``superreload`` and its ``deduperreload``, and
jurigged (both from the ``bench`` extra; skipped with a note when not installed). jurigged is
driven as its file watcher drives it when a file is saved: the registry's code file for the path,
refreshed (it diffs the file against the source it last saw, re-runs the changed definitions and
moves their new code into the live functions). It works on a copy of its own, imported after it
started, as ``jurigged -m app`` would: it finds live functions by file and line from the code
objects it recorded, which the other peers' reloads would replace under it. It keeps one
registry for the whole run, as a process under jurigged does (a fresh registry cannot find the
functions an earlier one already moved: its pushes stop taking effect). That registry holds every
file it parsed (syntax trees: millions of objects after 100 big modules), so jurigged is measured
in a pass of its own after every other contender, the heap shrunk back to zero and grown again:
its trees weigh on its own later rows, as they would in its process, and on nobody else's.
Importing jurigged installs codefind's audit hook (process-wide, it cannot be removed), so
every contender runs with it installed. After each push, every peer's changed functions are
checked (not timed) to run the new code; a figure says "k of n not live" when k of its n pushes
(warm-ups included) left one running the old code. Every figure is the median of 21 pushes after
2 warm-up pushes (a peer slower than a second per push: at least 3, within 20 s, marked n=...);
each push is a real change (a new message each time).

Run ``.venv/bin/python bench/bench_upgrade.py`` (``--profile``: cProfile of the headline case).
``run()`` returns the rows. Targets (printed, never asserted): under 5 ms for the one-function
change, flat in heap size, faster than every peer at every size.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib
import io
import logging
import os
import pstats
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_build import _synthetic as synthetic_project  # noqa: E402  (the same 1,000 modules)
from bench_rebind import FUNCTIONS  # noqa: E402
from bench_rebind import module_source as big_module_source  # noqa: E402

import overlay  # noqa: E402
from overlay.format import delta as _delta  # noqa: E402
from overlay.bundle import ParentManifest, build_bundle, manifest_bytes_of  # noqa: E402
from overlay.keys import generate_signing_key  # noqa: E402

RUNS = 21
WARMUP = 2
MIN_RUNS, BUDGET_S = 3, 20.0  # for peers slower than a second per push
CHANGED = (1, 10, 100)
HEAPS = (0, 1_000_000, 3_000_000)
HEADLINE = (1, 1_000_000)  # (changed modules, live objects)
BIG = 100  # 200-function modules in the app
KINDS = (("big", f"{FUNCTIONS}-function module"), ("small", "50-line module"))
TARGETS = ("targets: median < 5 ms for the one-function change, flat in heap size, faster than every "
           "peer at every size")
SKIPPED = "skipped: pip install -e '.[bench]'"
JURIGGED = "jurigged"
PREFIXES = {"reload": "d_", JURIGGED: "j_"}  # the disk copies' package prefixes (App.disk)

STATE_MODULE = '''"""The app's live objects: what a busy server holds in memory."""

STATE = []


def shrink():
    """Drop every object ``grow`` added."""
    STATE.clear()


def grow(n):
    """Add ``n`` objects the garbage collector tracks (a tuple holding a list stays tracked)."""
    for i in range(n // 2):
        tags = [i]
        STATE.append((i, tags))
'''
_MESSAGE = re.compile(r'(log\.debug\("\w+ total for %d items: %\.2f)[^"]*(")')


BIG_HEADER = f'"""A {FUNCTIONS}-function module."""\n'
_BIG_LINE = re.compile(r"(    '''Function 0\.'''\n    x = a \+ b)( \+ \d+)?\n")


def changed_source(source: str, variant: int) -> str:
    """The module with one line of one function changed: in a 50-line module the message its total
    function logs, in a 200-function module the first line of ``func_0``."""
    if source.startswith(BIG_HEADER):
        new, count = _BIG_LINE.subn(rf"\g<1> + {variant}\n", source, count=1)
    else:
        new, count = _MESSAGE.subn(rf"\g<1> (v{variant})\g<2>", source, count=1)
    assert count == 1, "the module no longer has the line this benchmark edits"
    return new


def spread(names: list[str], count: int) -> list[str]:
    """``count`` of ``names``, spread evenly."""
    step = len(names) // count
    return [names[i * step] for i in range(count)]


class App:
    """The synthetic project twice: served by habanero from a store, and imported from disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        project = synthetic_project(root / "project")
        self.packages = sorted(p.name for p in project.iterdir() if (p / "__init__.py").exists())
        (project / self.packages[0] / "state.py").write_text(STATE_MODULE)
        self.sources: dict[str, tuple[str, str]] = {}  # module -> (kind, source) as served now
        for package in self.packages:
            for path in sorted((project / package).glob("*.py")):
                name = package if path.stem == "__init__" else f"{package}.{path.stem}"
                self.sources[name] = ("package" if path.stem == "__init__" else "module", path.read_text())
        plain = [n for n, (kind, _) in self.sources.items() if kind == "module" and not n.endswith(".state")]
        self.big = spread(plain, BIG)
        for name in self.big:
            package, _, module = name.partition(".")
            path = next((project / package).glob(f"{module.partition('.')[0]}.py"))
            source = BIG_HEADER + big_module_source()
            path.write_text(source)
            self.sources[name] = ("module", source)
        self.editable = {"big": self.big, "small": [n for n in plain if n not in self.big]}
        # The peers' copies: same files under other package names, imported from disk; one for
        # the reloaders, one for jurigged (see the module's docstring).
        self.disk = root / "disk"
        for prefix in PREFIXES.values():
            for package in self.packages:
                shutil.copytree(project / package, self.disk / f"{prefix}{package}")
        key = generate_signing_key(root / "key", comment="bench")
        self.key = key
        (root / "trusted_keys").write_text(key.public.line() + "\n")
        self.version = 0   # of the bundles pushed
        self.edits = 0     # of the changes written to the disk copy
        self.manifest: bytes | None = None

    # -------------------------------------------------------------------------- habanero side

    def install(self) -> Any:
        self.ov = overlay.install(packages=self.packages, app_id="synthetic",
                                  trusted_keys=self.root / "trusted_keys", store=self.root / "store")
        self.ov.apply(self.next_bundle([], delta=False))
        for name in self.sources:
            importlib.import_module(name)
        return self.ov

    def next_bundle(self, modules: list[str], *, delta: bool, variant: int | None = None) -> bytes:
        """The next version: ``modules`` changed; packed against the previous one when ``delta``."""
        self.version += 1
        for name in modules:
            kind, source = self.sources[name]
            self.sources[name] = (kind, changed_source(source, variant if variant is not None else self.version))
        files = {name: (kind, source.encode()) for name, (kind, source) in self.sources.items()}
        base = ParentManifest.from_manifest(self.manifest) if delta and self.manifest is not None else None
        data = build_bundle(files, app_id="synthetic", version=self.version, signers=[self.key], base=base)
        self.manifest = manifest_bytes_of(data)
        return _delta.pack(data, base, [self.key]) if base is not None else data

    # --------------------------------------------------------------------------- peers' side

    def import_disk_copy(self, prefix: str) -> None:
        if str(self.disk) not in sys.path:
            sys.path.insert(0, str(self.disk))
        for name in self.sources:
            importlib.import_module(f"{prefix}{name}")

    def disk_path(self, name: str, prefix: str) -> Path:
        package, _, module = name.partition(".")
        return self.disk / f"{prefix}{package}" / f"{module}.py"


def pick(modules: list[str], count: int) -> list[str]:
    """``count`` modules spread evenly over the app."""
    return spread(modules, count)


def _median_ms(samples: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples)}


# ---------------------------------------------------------------------------------- measuring


def bench_habanero(app: App, modules: list[str], *, delta: bool, sync: str = "background") -> dict[str, Any]:
    bundles = [app.next_bundle(modules, delta=delta) for _ in range(WARMUP + RUNS)]
    store = app.ov.store
    saved_sync, store.sync = store.sync, sync  # white box: the mode install(sync=...) would set
    walls, phases = [], []
    gc.collect()
    try:
        for i, data in enumerate(bundles):
            started = time.perf_counter()
            report = app.ov.apply(data)
            elapsed = (time.perf_counter() - started) * 1000
            assert report.changed == sorted(modules) and report.patched == len(modules), report
            if i >= WARMUP:
                walls.append(elapsed)
                phases.append(report.timings_ms)
            store.settle()  # the background flush of one push is not charged to the next
    finally:
        store.sync = saved_sync
    phase_medians = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    return {**_median_ms(walls), "phases": phase_medians, "bytes": len(bundles[-1]), "runs": len(walls)}


def bench_disk(app: App, modules: list[str], reload_one: Callable[[Any], object], prefix: str) -> dict[str, Any]:
    """Write the change to a disk copy (not timed), then time ``reload_one`` on each module; count
    (not timed) the pushes after which a module's changed function does not run the new code.

    A peer that walks the heap for every class (superreload) takes seconds per push at millions of
    objects; it gets fewer pushes (at least ``MIN_RUNS``) once it has used ``BUDGET_S``.
    """
    loaded = [sys.modules[f"{prefix}{name}"] for name in modules]
    samples: list[float] = []
    warmups, spent, missed = 0, 0.0, 0
    gc.collect()
    while len(samples) < RUNS and not (len(samples) >= MIN_RUNS and spent > BUDGET_S):
        app.edits += 1
        for name in modules:
            path = app.disk_path(name, prefix)
            path.write_text(changed_source(path.read_text(), app.edits))
        started = time.perf_counter()
        for module in loaded:
            reload_one(module)
        elapsed = time.perf_counter() - started
        missed += not all(runs_change(module, app.edits) for module in loaded)
        if warmups < WARMUP and (warmups == 0 or elapsed < 1):  # a slow peer: one warm-up is enough
            warmups += 1
            continue
        samples.append(elapsed * 1000)
        spent += elapsed
    return {**_median_ms(samples), "runs": len(samples), "missed": missed, "pushes": warmups + len(samples)}


def runs_change(module: Any, variant: int) -> bool:
    """Whether the function ``changed_source`` edits runs the edit numbered ``variant``."""
    if hasattr(module, "func_0"):
        return variant in module.func_0.__code__.co_consts
    total = next(f for n, f in vars(module).items() if "_total_" in n)
    return any(isinstance(c, str) and c.endswith(f" (v{variant})") for c in total.__code__.co_consts)


def jurigged_peer() -> Callable[[], Callable[[Any], object]] | None:
    """jurigged as a factory of its per-module update, driven as its watcher drives it on a save."""
    try:
        from jurigged.register import Registry
    except ImportError:
        return None

    def make() -> Callable[[Any], object]:
        registry = Registry()  # one of our own for the run, not the global one ``jurigged.watch`` uses
        errors: list[BaseException] = []
        registry.set_logger(lambda event: errors.append(event) if isinstance(event, BaseException) else None)
        for name, module in sys.modules.items():  # what watch() registers at start: every watched file
            if name.startswith(PREFIXES[JURIGGED]):
                registry.prepare(name, module.__file__)

        def update_one(module: Any) -> None:
            registry.get(module.__file__).refresh()  # the watcher's refresh(path), without its catch-all
            if errors:
                raise RuntimeError(f"jurigged could not update {module.__name__}: {errors[0]!r}")

        return update_one

    return make


def peers() -> dict[str, Callable[[], Callable[[Any], object]] | None]:
    """Each reloader as a factory of its per-module reload function; None when IPython is missing."""

    def reload() -> Callable[[Any], object]:
        return importlib.reload

    try:
        from IPython.extensions.autoreload import superreload
    except ImportError:
        return {"importlib.reload": reload, "IPython superreload": None, "IPython deduperreload": None}

    def make_superreload() -> Callable[[Any], object]:
        old_objects: dict = {}  # as autoreload's ModuleReloader keeps it, across reloads
        return lambda module: superreload(module, importlib.reload, old_objects)

    found: dict[str, Any] = {"importlib.reload": reload, "IPython superreload": make_superreload}
    try:
        from IPython.extensions.deduperreload.deduperreload import DeduperReloader
    except ImportError:
        found["IPython deduperreload"] = None
        return found

    def make_deduper() -> Callable[[Any], object]:
        deduper = DeduperReloader()
        deduper.update_sources()  # what autoreload does after each cell: remember every module's source

        def reload_one(module: Any) -> None:
            if not deduper.maybe_reload_module(module):  # it fell back: then autoreload superreloads
                raise RuntimeError(f"deduperreload could not patch {module.__name__} in place")

        return reload_one

    found["IPython deduperreload"] = make_deduper
    return found


def run(profile: bool = False) -> list[dict[str, Any]]:
    """Every measurement as a row: ``{"tool", "kind", "changed", "heap", "median_ms", "min_ms", ...}``."""
    logging.getLogger("overlay").setLevel(logging.WARNING)
    sys.dont_write_bytecode = True  # the peers must compile the changed source each time, like a push
    rows: list[dict[str, Any]] = []
    saved_modules, saved_path = dict(sys.modules), list(sys.path)
    with tempfile.TemporaryDirectory(prefix="habanero-bench-upgrade-") as tmp:
        app = App(Path(tmp))
        ov = app.install()
        try:
            app.import_disk_copy(PREFIXES["reload"])
            tools: dict[str, Any] = peers()
            tools[JURIGGED] = jurigged_peer()  # imports jurigged: codefind records the code it sees
            if tools[JURIGGED] is not None:
                app.import_disk_copy(PREFIXES[JURIGGED])  # imported after it started, as under it
            made = {name: (factory() if factory is not None else None) for name, factory in tools.items()}
            state = sys.modules[f"{app.packages[0]}.state"]
            # Two passes over the heap sizes: habanero and the reloaders, then jurigged alone (see
            # the module's docstring), each from an empty heap. Not installed, it says so in the first.
            alone = [JURIGGED] if made[JURIGGED] is not None else []
            for with_habanero, names in ((True, [n for n in made if n not in alone]), (False, alone)):
                if not names:
                    continue
                contenders = {name: made[name] for name in names}
                state.shrink()
                live = 0
                for heap in HEAPS:
                    state.grow(heap - live)
                    live = heap
                    gc.collect()
                    tracked = len(gc.get_objects())
                    for kind, _ in KINDS:
                        for count in CHANGED:
                            modules = pick(app.editable[kind], count)
                            base = {"kind": kind, "changed": count, "heap": heap, "tracked": tracked}
                            rows += _measure_all(app, contenders, modules, base, habanero=with_habanero)
                    if profile and with_habanero and heap == HEADLINE[1]:
                        rows.append({"tool": "profile", **profile_apply(app, pick(app.editable["big"], HEADLINE[0]))})
        finally:
            ov.uninstall()
            sys.path[:] = saved_path
            for name in [n for n in sys.modules if n not in saved_modules]:
                del sys.modules[name]
    return rows


def _measure_all(app: App, made: dict[str, Any], modules: list[str], base: dict[str, Any], *,
                 habanero: bool = True) -> list[dict[str, Any]]:
    count, kind = base["changed"], base["kind"]
    measure: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if habanero:
        measure.append(("habanero (packed delta)", lambda: bench_habanero(app, modules, delta=True)))
    if count == 1 and habanero:
        measure.append(("habanero (full bundle)", lambda: bench_habanero(app, modules, delta=False)))
        if (count, base["heap"]) == HEADLINE:
            measure.append(("habanero (packed delta, sync=commit)",
                            lambda: bench_habanero(app, modules, delta=True, sync="commit")))
    for name, reload_one in made.items():
        if reload_one is None:
            measure.append((name, lambda: {"skipped": SKIPPED}))
        elif name == "IPython superreload" and kind == "big" and count > 1:
            # It walks the heap for every class of every module: minutes per push at this size.
            measure.append((name, lambda: {"skipped": "skipped: minutes per push (see the 1-module row)"}))
        elif name == JURIGGED and kind == "big" and count == max(CHANGED) and base["heap"]:
            # It re-parses each changed file whole and looks for each changed function's referrers
            # in the heap: over a minute per push at 0 objects already, measured once there.
            measure.append((name, lambda: {"skipped": "skipped: minutes per push (see the 0-object row)"}))
        else:
            prefix = PREFIXES[JURIGGED if name == JURIGGED else "reload"]
            measure.append((name, lambda r=reload_one, p=prefix: bench_disk(app, modules, r, p)))
    rows = []
    for name, fn in measure:
        started = time.perf_counter()
        rows.append({"tool": name, **base, **fn()})
        _progress(f"{name}, {count} {kind} changed, {base['heap']:,} objects: {time.perf_counter() - started:.1f} s")
    return rows


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def profile_apply(app: App, modules: list[str]) -> dict[str, Any]:
    """cProfile of RUNS applies of the headline change: where the server-side time goes."""
    bundles = [app.next_bundle(modules, delta=True) for _ in range(RUNS)]
    profiler = cProfile.Profile()
    for data in bundles:
        profiler.runcall(app.ov.apply, data)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime")
    stats.print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return {"text": out.getvalue()}


# ------------------------------------------------------------------------------------ report


def _fmt(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return row["skipped"]
    fewer = f" (n={row['runs']})" if row["runs"] < RUNS else ""
    missed = f" ({row['missed']} of {row['pushes']} not live)" if row.get("missed") else ""
    return f"{row['median_ms']:.2f}{fewer}{missed}"


def tables(rows: list[dict[str, Any]]) -> str:
    out = []
    changed, heap = HEADLINE
    for kind, label in KINDS:
        head = [r for r in rows if r.get("kind") == kind and r.get("changed") == changed
                and r.get("heap") == heap]
        ours = next(r for r in head if r["tool"] == "habanero (packed delta)")
        out += [f"### One-function change in one {label} of the 1,000-module app, {heap:,} live objects "
                f"({ours['tracked']:,} tracked by the gc), median of {RUNS}\n",
                "| tool | median ms | min | max | vs habanero |", "|---|---:|---:|---:|---:|"]
        for r in head:
            if "skipped" in r:
                out.append(f"| {r['tool']} | {r['skipped']} | | | |")
            else:
                out.append(f"| {r['tool']} | {_fmt(r)} | {r['min_ms']:.2f} | {r['max_ms']:.2f} | "
                           f"{r['median_ms'] / ours['median_ms']:.1f}x |")
        out.append("")

    tools = list(dict.fromkeys(r["tool"] for r in rows if r["tool"] != "profile"))
    out += [f"### Median ms by changed modules and live objects (median of {RUNS})\n",
            "| tool | module | changed | " + " | ".join(f"{h:,} objects" for h in HEAPS) + " |",
            "|---|---|---:|" + "---:|" * len(HEAPS)]
    for kind, label in KINDS:
        for tool in tools:
            for count in CHANGED:
                cells = [next((r for r in rows if r["tool"] == tool and r.get("kind") == kind
                               and r.get("changed") == count and r.get("heap") == h), None) for h in HEAPS]
                if any(cells):
                    out.append(f"| {tool} | {label} | {count} | "
                               + " | ".join(_fmt(c) if c else "" for c in cells) + " |")

    out += ["", "### Where habanero's server-side time goes (median ms per phase, report.timings_ms)\n",
            "| bundle | module | changed | objects | verify | plan | stage | apply | commit | total |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    labels = dict(KINDS)
    for r in rows:
        if r["tool"].startswith("habanero") and "phases" in r:
            p = r["phases"]
            out.append(f"| {r['tool'].split('(')[1][:-1]} ({r['bytes'] / 1024:,.0f} KiB) | {labels[r['kind']]} | "
                       f"{r['changed']} | {r['heap']:,} | {p['verify']:.2f} | {p['plan']:.2f} | {p['stage']:.2f} | "
                       f"{p['apply']:.2f} | {p['commit']:.2f} | {p['total']:.2f} |")
    for r in rows:
        if r["tool"] == "profile":
            out += ["", f"### cProfile of {RUNS} applies (headline case)\n", "```", r["text"].strip(), "```"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true", help="add a cProfile of the headline case")
    args = parser.parse_args(argv)
    rows = run(profile=args.profile)
    print(tables(rows))
    print(f"\nPython {sys.version.split()[0]}, {os.cpu_count()} CPUs, store on {tempfile.gettempdir()}. "
          f"{TARGETS}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
