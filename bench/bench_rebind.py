"""How long a push takes to apply to one module, with a million live objects in the heap.

Builds a 200-function module (plus classes and closure factories), fills the heap with
1,000,000 tracked objects, then times ``overlay.rebind.update_module`` on:

* a one-function change that keeps the line count (the common "fix a line" push);
* a one-function change that adds a line, so every later definition moves;
* a change inside a closure factory's nested function, which needs the heap pass;

and ``importlib.reload`` of the same module with the same one-function change, side by side.
Each figure is the median of 20 pushes, alternating v1 -> v2 -> v1 so every push is real.

Run: .venv/bin/python bench/bench_rebind.py
"""

from __future__ import annotations

import gc
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overlay.rebinding.journal import Journal  # noqa: E402
from overlay.rebind import update_module  # noqa: E402

FUNCTIONS = 200
HEAP = 1_000_000
RUNS = 20


def module_source() -> str:
    parts = ["import functools\n\nCACHE = {}\n"]
    for i in range(FUNCTIONS):
        parts.append(
            f"\n\ndef func_{i}(a, b=1, *args, **kw):\n"
            f"    '''Function {i}.'''\n"
            f"    x = a + b\n"
            f"    for j in range(3):\n"
            f"        x += j * {i}\n"
            f"    return [x, CACHE.get(a)]\n")
        if i % 10 == 0:
            parts.append(
                f"\n\nclass Model{i}:\n"
                f"    scale = {i}\n\n"
                f"    def value(self, q):\n"
                f"        return q * self.scale\n\n"
                f"    @property\n"
                f"    def name(self):\n"
                f"        return 'model{i}'\n")
        if i % 50 == 0:
            parts.append(
                f"\n\ndef factory_{i}(n):\n"
                f"    def inner(x):\n"
                f"        return x + n\n"
                f"    return inner\n\n\n"
                f"made_{i} = factory_{i}({i})\n")
    return "".join(parts)


def build_heap(n: int) -> list:
    """``n`` live objects the garbage collector tracks: what a busy server holds."""

    class Record:
        __slots__ = ("key", "value")

        def __init__(self, key, value):
            self.key, self.value = key, value

    # Each object refers to a list, so the collector keeps tracking it (a dict or tuple of
    # plain ints would be untracked and cost a heap pass nothing).
    heap: list = []
    for i in range(n // 4):
        tags = [i]
        heap.extend((tags, {"id": i, "tags": tags}, Record(i, tags), (i, tags)))
    return heap


def median_ms(action: Callable[[int], None], runs: int = RUNS) -> tuple[float, float, float]:
    times = []
    for run in range(runs + 2):
        started = time.perf_counter()
        action(run)
        elapsed = (time.perf_counter() - started) * 1000
        if run >= 2:  # two warm-up pushes: the first one parses the old source once
            times.append(elapsed)
    return statistics.median(times), min(times), max(times)


def bench_update(module, versions: list[str], path: Path) -> tuple[float, float, float]:
    current = [versions[0]]

    def push(run: int) -> None:
        new = versions[(run + 1) % 2]
        journal = Journal()
        update_module(module, new, filename=str(path), old_source=current[0], journal=journal)
        journal.commit()
        current[0] = new

    return median_ms(push)


def bench_reload(module, versions: list[str], path: Path) -> tuple[float, float, float]:
    def push(run: int) -> None:
        path.write_text(versions[(run + 1) % 2])
        importlib.invalidate_caches()
        importlib.reload(module)

    return median_ms(push)


def main() -> None:
    sys.dont_write_bytecode = True  # reload must compile the changed source every time
    v1 = module_source()
    body_change = v1.replace("x += j * 7\n", "x += j * 7 + 1\n", 1)
    line_added = v1.replace("x += j * 7\n", "x += j * 7\n        x -= 1\n", 1)
    closure_change = v1.replace("return x + n\n", "return x + n + 1\n", 1)
    assert body_change != v1 and line_added != v1 and closure_change != v1

    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        path = Path(tmp) / "bench_app_module.py"
        path.write_text(v1)
        module = importlib.import_module("bench_app_module")
        heap = build_heap(HEAP)
        gc.collect()
        tracked = len(gc.get_objects())
        lines = len(v1.splitlines())

        rows = [
            ("update_module: one-function change", bench_update(module, [v1, body_change], path)),
            ("update_module: one-function change + 1 line (199 defs move)",
             bench_update(module, [v1, line_added], path)),
            ("update_module: closure body change (heap pass)",
             bench_update(module, [v1, closure_change], path)),
        ]
        path.write_text(v1)
        importlib.reload(module)
        reload_times = bench_reload(module, [v1, body_change], path)
        rows.append(("importlib.reload: one-function change", reload_times))
        del heap

    print(f"module: {FUNCTIONS} functions, {lines} lines; heap: {tracked:,} objects tracked "
          f"by the gc; median of {RUNS} pushes\n")
    width = max(len(name) for name, _ in rows)
    print(f"{'scenario':<{width}}  {'median ms':>9}  {'min':>7}  {'max':>7}")
    print("-" * (width + 30))
    for name, (med, low, high) in rows:
        print(f"{name:<{width}}  {med:9.2f}  {low:7.2f}  {high:7.2f}")


if __name__ == "__main__":
    main()
