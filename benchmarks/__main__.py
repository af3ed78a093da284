"""Run every benchmark (or the ones named on the command line).

Arguments after a name that are not names themselves go to that benchmark's ``main``
(``python -m benchmarks soak 30``). A benchmark whose module sets ``ONLY_BY_NAME = True``
(the long soak) runs only when named. A benchmark's ``main`` may return an exit status.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import benchmarks


def main(argv: list[str]) -> int:
    names = sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name.startswith("bench_")
    )
    selected: list[tuple[str, list[str]]] = []
    for arg in argv:
        if arg in names:
            selected.append((arg, []))
        elif selected and not arg.startswith("-"):
            selected[-1][1].append(arg)
        else:
            print(f"unknown benchmark: {arg!r}; available: {names}", file=sys.stderr)
            return 2
    if not argv:
        selected = [
            (name, [])
            for name in names
            if not getattr(
                importlib.import_module(f"benchmarks.bench_{name}"), "ONLY_BY_NAME", False
            )
        ]
    status = 0
    for name, args in selected:
        print(f"\n=== benchmark: {name} ===", flush=True)
        start = time.perf_counter()
        status = max(status, importlib.import_module(f"benchmarks.bench_{name}").main(*args) or 0)
        print(f"=== {name} done in {time.perf_counter() - start:.1f} s ===", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
