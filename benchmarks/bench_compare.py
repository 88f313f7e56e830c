"""Benchmark: `tlpipe compare` of this checkout against the code before issue 15 (commit be83499), same heads.

Issue 15 asks that `compare` take no more than 10 % longer than before it for the same heads (the four
default heads: logreg, svm, rbf-svm, mlp), on ../shared/datasets/cats_vs_dogs and flowers5_128px.

What it does:

1. Takes the old code with ``git archive OLD_COMMIT`` into ``WORK/old-src`` (no worktree, nothing
   installed) and runs it as ``PYTHONPATH=WORK/old-src python -m tlpipe.pipeline.cli`` with this
   interpreter's libraries (the old code runs from a source checkout: its ``tlpipe`` facade finds the
   packages beside it). This checkout runs the same way with ``PYTHONPATH=<this checkout>``.
2. Extracts each data set once with each version (the cache schema changed between them: the old
   compare reads only a cache the old code wrote), MobileNetV2 1.0 with the real ImageNet weights of
   ../shared/weights, on the CPU; the new extraction uses ``--resize-filter antialias``, the old code's
   resize, so both compares see the same embeddings up to float rounding. Caches and model stores stay
   in ``WORK`` and are reused by later runs (delete ``WORK`` to start again).
3. Times the whole command (process start-up included, as a user waits for it), ``compare CACHE`` and
   ``compare CACHE --report DIR``, old and new interleaved: each round runs every (data set, mode) pair
   once per version, the version that goes first alternating between rounds, so a change in machine
   load hits both alike. Reports the median wall-clock seconds per version, the ratio new / old of the
   medians and the ratio of each interleaved pair, and the same for CPU seconds (the command and the
   joblib workers it waited for: steadier on a loaded machine, blind to a core left idle).

The four default heads, 5-fold CV, seed 0, every core (the defaults of both versions). The new report
draws a UMAP map only when asked (``compare --umap``; the old report had no map at all); ``--umap`` here
passes it to the new ``compare --report`` to time what it adds (~10 s of numba compilation).

Run on a quiet machine (the figure that counts):

    .venv/bin/python benchmarks/bench_compare.py --rounds 5

``--quick``: one round, cats_vs_dogs only (a smoke run, a few minutes). Writes
benchmarks/results/compare.json (``--quick``: compare_quick.json); ``--out`` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OLD_COMMIT = "be83499"  # main before issue 15's work (no refit, no learning curve, fixed-C logreg)
DATASETS = {
    # name -> the source given to `tlpipe extract` (cats_vs_dogs: its manifest carries the train/test split)
    "cats_vs_dogs": SHARED / "datasets" / "cats_vs_dogs" / "manifest.csv",
    "flowers5_128px": SHARED / "datasets" / "flowers5_128px",
}
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"
MODES = {"plain": [], "report": ["--report"]}


def run(cmd: list[str], env: dict, cwd: Path, what: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        sys.exit(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return done


def environment(source: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TLPIPE_MODEL_STORE")}
    env |= {"PYTHONPATH": str(source), "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    return env


def old_source(work: Path, commit: str) -> Path:
    """``git archive`` of ``commit`` unpacked into WORK/old-src (kept between runs)."""
    target = work / "old-src"
    stamp = target / ".commit"
    if stamp.is_file() and stamp.read_text().strip() == commit:
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    stamp.write_text(commit)
    return target


def extract(version: str, source: Path, work: Path, dataset: str, weights: Path) -> Path:
    """The cache of ``dataset`` written by ``version``'s own extract (reused when present)."""
    folder = work / version
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / f"{dataset}.h5"
    done = folder / f"{dataset}.done"
    if cache.is_file() and done.is_file():
        return cache
    cache.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "tlpipe.pipeline.cli",
        "extract",
        str(DATASETS[dataset]),
        "--out",
        str(cache),
        "--weights",
        str(weights),
        "--store",
        str(folder / "store"),
        "--device",
        "cpu",
    ]
    if version == "new":
        cmd += ["--resize-filter", "antialias"]  # the old code's resize: the same embeddings for both
    print(f"  extracting {dataset} with the {version} code…", flush=True)
    started = time.perf_counter()
    run(cmd, environment(source), folder, f"{version} extract of {dataset}")
    print(f"    {time.perf_counter() - started:.0f} s", flush=True)
    done.write_text("ok")
    return cache


def time_compare(version: str, source: Path, cache: Path, mode: str, work: Path, umap: bool) -> dict:
    cmd = [sys.executable, "-m", "tlpipe.pipeline.cli", "compare", str(cache)]
    report = None
    if mode == "report":
        report = Path(tempfile.mkdtemp(prefix=f"report-{version}-", dir=work))
        cmd += ["--report", str(report)] + (["--umap"] if umap and version == "new" else [])
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = run(cmd, environment(source), work, f"{version} compare")
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the command and every process it waited for (joblib's workers): steadier than wall time
    # on a loaded machine, though it misses what idles a core (a serial step while the other core waits).
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    best = next((line.split("best:")[1].strip() for line in done.stdout.splitlines() if "best:" in line), "?")
    files = sorted(p.name for p in report.iterdir()) if report else []
    if report:
        shutil.rmtree(report, ignore_errors=True)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_1min_before": load,
        "best": best.split("·")[0].strip(),
        "report_files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, cats_vs_dogs only (smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3; --quick: 1)")
    parser.add_argument("--datasets", default=None, help=f"comma-separated, of {', '.join(DATASETS)} (default: both)")
    parser.add_argument("--modes", default="plain,report", help="plain (no report), report (--report DIR), or both")
    parser.add_argument("--old", default=OLD_COMMIT, help=f"commit of the code before issue 15 (default {OLD_COMMIT})")
    parser.add_argument(
        "--new",
        type=Path,
        default=ROOT,
        help="source checkout of the new code (default: this one; give a copy when editing this one "
        "while the benchmark runs, since each compare imports it afresh)",
    )
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "tlpipe-bench-compare",
        help="caches, model stores and the old source (kept between runs)",
    )
    parser.add_argument(
        "--umap", action="store_true", help="pass --umap to the new compare --report (the old report drew no map)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    datasets = args.datasets.split(",") if args.datasets else ["cats_vs_dogs"] if args.quick else list(DATASETS)
    rounds = 1 if args.quick else args.rounds
    modes = [m for m in args.modes.split(",") if m]
    for needed in [args.weights, *(DATASETS[d] for d in datasets)]:
        if not needed.exists():
            sys.exit(f"bench_compare needs {needed} (../shared)")
    args.work.mkdir(parents=True, exist_ok=True)
    sources = {"old": old_source(args.work, args.old), "new": args.new.resolve()}
    caches = {(v, d): extract(v, sources[v], args.work, d, args.weights) for d in datasets for v in ("old", "new")}

    times: dict = {f"{d}/{m}": {"old": [], "new": []} for d in datasets for m in modes}
    for r in range(rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for d in datasets:
            for m in modes:
                for v in order:
                    t = time_compare(v, sources[v], caches[(v, d)], m, args.work, args.umap)
                    times[f"{d}/{m}"][v].append(t)
                    print(
                        f"  round {r + 1}/{rounds} {d:15s} {m:6s} {v}: {t['seconds']:6.1f} s, "
                        f"{t['cpu_seconds']:6.1f} cpu-s "
                        f"(load {t['load_1min_before']:.1f}, best {t['best']})",
                        flush=True,
                    )

    summary = {}
    for key, pair in times.items():
        old = [t["seconds"] for t in pair["old"]]
        new = [t["seconds"] for t in pair["new"]]
        old_cpu = [t["cpu_seconds"] for t in pair["old"]]
        new_cpu = [t["cpu_seconds"] for t in pair["new"]]
        summary[key] = {
            "old_median_s": statistics.median(old),
            "new_median_s": statistics.median(new),
            "ratio_of_medians": statistics.median(new) / statistics.median(old),
            "old_median_cpu_s": statistics.median(old_cpu),
            "new_median_cpu_s": statistics.median(new_cpu),
            "cpu_ratio_of_medians": statistics.median(new_cpu) / statistics.median(old_cpu),
            "pair_ratios": [n / o for n, o in zip(new, old)],
            "old_s": old,
            "new_s": new,
            "new_report_files": pair["new"][0]["report_files"],
            "old_report_files": pair["old"][0]["report_files"],
        }
    try:
        new_commit = (
            subprocess.run(
                ["git", "-C", str(sources["new"]), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            or "?"
        )
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(sources["new"]), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except OSError:
        new_commit, dirty = "?", False
    results = {
        "what": "wall-clock seconds of `python -m tlpipe.pipeline.cli compare CACHE [--report DIR]` (process start-up "
        "included), default heads logreg, svm, rbf-svm, mlp, 5-fold CV, every core; old = "
        f"{args.old} (before issue 15), new = this checkout; interleaved rounds",
        "old_commit": args.old,
        "new_source": str(sources["new"]),
        "new_commit": new_commit + ("-dirty" if dirty else ""),
        "umap_in_new_report": args.umap,
        "rounds": rounds,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "results": summary,
        "runs": times,
    }
    out = args.out or ROOT / "benchmarks" / "results" / ("compare_quick.json" if args.quick else "compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\nmedians; wall = wall-clock seconds, cpu = CPU seconds of the process and its workers")
    print(
        f"{'data set / mode':24s} {'old wall':>8s} {'new wall':>8s} {'new/old':>8s} {'old cpu':>8s} {'new cpu':>8s} "
        f"{'new/old':>8s}  wall ratio per pair"
    )
    for key, s in summary.items():
        print(
            f"{key:24s} {s['old_median_s']:8.1f} {s['new_median_s']:8.1f} {s['ratio_of_medians']:8.3f} "
            f"{s['old_median_cpu_s']:8.1f} {s['new_median_cpu_s']:8.1f} {s['cpu_ratio_of_medians']:8.3f}  "
            + ", ".join(f"{r:.2f}" for r in s["pair_ratios"])
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
