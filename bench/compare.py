"""Two commits side by side: a benchmark run against an older commit and the working tree in turn.

A refactoring is judged by whether it made the mesh slower, and a figure taken last week on a
machine in another mood says nothing about that. This runs `pick.py` and/or `overhead.py` of
each tree (each tree's own script against its own `meshlib`), alternating which goes first,
for a few rounds in one run, and compares the medians over the rounds of every figure both
report. The base commit is checked out in a temporary git worktree, removed afterwards.

    .venv/bin/python bench/compare.py --base aa0e723             # pick and overhead, quick
    .venv/bin/python bench/compare.py --base main~3 --bench pick --rounds 5 --full

Figures: for `pick`, every `median_ns` (lower is better); for `overhead`, each scenario's
mesh-to-httpx ratios measured within the same run (p50 and CPU per request: lower is better;
requests per second: higher is better), which cancel most of the machine's drift.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, table, write_json

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("pick", "overhead")


def figures(bench: str, data: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    """name -> (value, higher_is_better) of the figures worth comparing in one result file."""
    out: dict[str, tuple[float, bool]] = {}
    if bench == "pick":
        for path, value in _leaves({"decisions": data.get("decisions"), "stack": data.get("stack")}):
            if path[-1] == "median_ns":
                out["/".join(path[:-1])] = (float(value), False)
        return out
    for name, scenario in (data.get("scenarios") or {}).items():
        ratio = scenario.get("ratio") or {}
        for key, better_high in (("p50_us", False), ("cpu_us_per_req", False), ("rps", True)):
            if isinstance(ratio.get(key), int | float):
                out[f"{name} mesh/httpx {key}"] = (float(ratio[key]), better_high)
    return out


def _leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, str(key)))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, value


def run_one(tree: Path, bench: str, quick: bool, out: Path) -> dict[str, Any]:
    args = [sys.executable, str(tree / "bench" / f"{bench}.py"), "--json", str(out)]
    if quick:
        args.append("--quick")
    if bench == "overhead":
        args += ["--png", str(out.with_suffix(".png"))]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(args, cwd=tree, env=env, stdout=subprocess.DEVNULL)
    if done.returncode != 0:  # both trees run in this venv: an older one may need what was dropped since
        raise SystemExit(f"{bench}.py of {tree} failed (is every package that tree needs installed here?)")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the older commit (any git revision)")
    parser.add_argument("--bench", choices=BENCHES, action="append", help="pick and/or overhead (both)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternating")
    parser.add_argument("--full", action="store_true", help="full benchmark runs instead of --quick")
    parser.add_argument("--json", type=Path, default=RESULTS / "compare.json", help="where to write results")
    args = parser.parse_args(argv)
    benches = args.bench or list(BENCHES)
    base_rev = subprocess.run(
        ["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meshlib-compare-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(base_tree), base_rev], cwd=ROOT, check=True
        )
        try:
            trees = {"base": base_tree, "head": ROOT}
            for bench in benches:
                runs: dict[str, list[dict[str, tuple[float, bool]]]] = {"base": [], "head": []}
                for round_no in range(args.rounds):
                    order = ("base", "head") if round_no % 2 == 0 else ("head", "base")
                    for side in order:
                        print(f"{bench}: round {round_no + 1}/{args.rounds}, {side}", flush=True)
                        out = Path(tmp) / f"{bench}-{side}-{round_no}.json"
                        runs[side].append(figures(bench, run_one(trees[side], bench, not args.full, out)))
                results[bench] = compare(runs)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
    for bench, rows in results.items():
        print(f"\n{bench}: median of {args.rounds} rounds, base {base_rev} against the working tree")
        print(
            table(
                ["figure", "base", "head", "head/base", "verdict"],
                [
                    [r["figure"], f"{r['base']:.4g}", f"{r['head']:.4g}", f"{r['change']:.3f}", r["verdict"]]
                    for r in rows
                ],
            )
        )
    write_json(
        args.json,
        {
            "benchmark": "compare",
            "machine": machine_info(),
            "config": {
                "base": base_rev,
                "benches": benches,
                "rounds": args.rounds,
                "quick": not args.full,
                "elapsed_s": round(time.perf_counter() - started, 1),
            },
            "figures": results,
        },
    )
    return 0


def compare(runs: dict[str, list[dict[str, tuple[float, bool]]]]) -> list[dict[str, Any]]:
    """One row per figure both trees report: the median over rounds of each, and the change."""
    common = set.intersection(*(set(r) for r in runs["base"] + runs["head"]))
    rows = []
    for name in sorted(common):
        higher_is_better = runs["head"][0][name][1]
        base = statistics.median(r[name][0] for r in runs["base"])
        head = statistics.median(r[name][0] for r in runs["head"])
        change = head / base if base else float("nan")
        worse = change < 0.95 if higher_is_better else change > 1.05
        better = change > 1.05 if higher_is_better else change < 0.95
        verdict = "worse" if worse else "better" if better else "same"
        rows.append({"figure": name, "base": base, "head": head, "change": change, "verdict": verdict})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
