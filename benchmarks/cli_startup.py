"""CPU time of ``ndeconv --help`` and of each subcommand's ``--help``: what printing usage costs.

Each help runs in a fresh process ``--repeats`` times, interleaved over the commands (a load change hits all of
them alike); the figure is the child's CPU time, user + sys (``getrusage(RUSAGE_CHILDREN)``), which other processes
on the machine skew far less than wall time, with the wall time beside it. The target is under 0.5 s on a quiet
machine (issue 34); before the commands imported what they need only when they run, every help took 3.4-4 s, the
cost of importing torch, timm and the zoo. Writes ``benchmarks/results/cli_startup.json``.

    python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path, as the other benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402
from ndeconv.cli import COMMANDS  # noqa: E402

TARGET_S = 0.5


def _ndeconv() -> list[str]:
    """The console script beside this Python (what a user runs), else ``python -m ndeconv``."""
    script = Path(sys.executable).with_name("ndeconv")
    if script.is_file():
        return [str(script)]
    found = shutil.which("ndeconv")
    return [found] if found else [sys.executable, "-m", "ndeconv"]


def _run_once(argv: list[str]) -> tuple[float, float]:
    """(CPU seconds user + sys, wall seconds) of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=C.ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def measure(repeats: int) -> dict[str, dict]:
    base = _ndeconv()
    helps = {"ndeconv --help": [*base, "--help"]}
    helps.update({f"ndeconv {c.replace('_', '-')} --help": [*base, c.replace("_", "-"), "--help"] for c in COMMANDS})
    cpu: dict[str, list[float]] = {name: [] for name in helps}
    wall: dict[str, list[float]] = {name: [] for name in helps}
    for argv in helps.values():  # warm the file cache once, untimed
        _run_once(argv)
    for _ in range(repeats):
        for name, argv in helps.items():
            c, w = _run_once(argv)
            cpu[name].append(c)
            wall[name].append(w)
    return {name: {"cpu_s_median": round(statistics.median(cpu[name]), 3), "cpu_s_min": round(min(cpu[name]), 3),
                   "wall_s_median": round(statistics.median(wall[name]), 3),
                   "under_target": statistics.median(cpu[name]) < TARGET_S}
            for name in helps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each help (default: 5)")
    args = parser.parse_args(argv)
    results = measure(args.repeats)
    payload = {"command": C.command_line(), "repeats": args.repeats, "target_cpu_s": TARGET_S, "helps": results}
    path = C.write_result("cli_startup", payload)
    width = max(map(len, results))
    for name, r in results.items():
        print(f"{name:<{width}}  cpu {r['cpu_s_median']:.3f} s  wall {r['wall_s_median']:.3f} s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
