"""Before/after in one run: a benchmark script of an older commit and of the working tree, interleaved A/B/A/B.

    python benchmarks/bench_ab.py --old COMMIT [--rounds 2] [--out benchmarks/results/ab.json] -- SCRIPT [ARGS...]

SCRIPT (e.g. ``benchmarks/bench_score.py --quick``) runs once per round from each tree, as a whole process with
that tree first on ``PYTHONPATH`` (the old tree is ``git archive COMMIT``, so each side runs its own code and its
own copy of the script), each writing its JSON to a file of its own (``--out``, which every benchmark here
takes). Rounds alternate which side goes first. The result keeps every run's JSON and, for each numeric leaf
the two sides share, the median of the per-round ratios new/old, so a reader sees the spread, not one figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def archive(commit: str, into: Path) -> Path:
    """The tree of ``commit`` unpacked into ``into`` (no .git), for running its code as it was."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def run(tree: Path, script: list[str], out: Path) -> tuple[dict, float]:
    """One run of ``script`` from ``tree``; its JSON and its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    cmd = [sys.executable, str(tree / script[0]), *script[1:], "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=tree, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text()), time.perf_counter() - started


def leaves(value, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a JSON document, by its dotted path."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in leaves(item, f"{prefix}.{key}" if prefix else key).items()
        }
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{prefix}[{i}]").items()}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the commit whose code is the baseline")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...], relative to the tree root")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("give the benchmark script after --")
    with tempfile.TemporaryDirectory(prefix="tlpipe-ab-") as tmp:
        old = archive(args.old, Path(tmp) / "old")
        runs: dict[str, list] = {"old": [], "new": []}
        for r in range(args.rounds):
            order = [("old", old), ("new", ROOT)] if r % 2 == 0 else [("new", ROOT), ("old", old)]
            for side, tree in order:
                result, wall = run(tree, script, Path(tmp) / f"{side}-{r}.json")
                runs[side].append({"wall_s": wall, "result": result})
                print(f"round {r + 1} {side}: {wall:.1f} s", flush=True)
    ratios: dict[str, dict] = {}
    for r in range(args.rounds):
        a, b = leaves(runs["old"][r]), leaves(runs["new"][r])
        for key in sorted(set(a) & set(b)):
            if a[key]:
                ratios.setdefault(key, {"per_round": []})["per_round"].append(b[key] / a[key])
    for item in ratios.values():
        item["median"] = statistics.median(item["per_round"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "what": "new/old ratio of every numeric figure both sides report (median over interleaved rounds)",
                "old": args.old,
                "script": script,
                "rounds": args.rounds,
                "machine": {"cpu": _cpu(), "cores": os.cpu_count()},
                "ratios": ratios,
                "runs": runs,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
