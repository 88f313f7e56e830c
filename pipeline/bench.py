"""`tlpipe bench`: how fast a backbone runs here, per precision, batch size and thread count, against Keras.

Every figure comes from the same run on the same images: ONNX Runtime at fp32 (and int8 / fp16 when asked),
Keras ``model(x, training=False)`` on the same backbone, and image decoding on its own. Each configuration is
warmed up, then timed batch by batch for at least ``min_seconds``: images/s over the whole, p50/p95 per batch.
"""

from __future__ import annotations

import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.backbones.choice import ModelChoice
from tlpipe.backbones.deps import distribution_version
from tlpipe.backbones.export import VerificationError
from tlpipe.backbones.quantize import PRECISIONS, check_precision
from tlpipe.backbones.runtime import OnnxEmbedder, default_streams, physical_cores
from tlpipe.backbones.store import ModelStore, StoreEntry
from tlpipe.errors import InputError

__all__ = [
    "BENCH_CHOICE",
    "BenchReport",
    "Timing",
    "VNNI_FLAGS",
    "cpu_flags",
    "decode_throughput",
    "format_report",
    "machine_facts",
    "run_bench",
    "time_batches",
    "verdict",
]

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BENCH_CHOICE = (
    "backbone",
    "weights",
    "weights_dir",
    "size",
    "layer",
    "pooling",
    "model",
    "store",
)  # ModelChoice fields


@dataclass
class Timing:
    engine: str  # onnxruntime | keras
    precision: str
    batch: int
    threads: int | str
    images_per_s: float
    p50_ms: float
    p95_ms: float
    batches: int
    streams: int = 1  # sessions run side by side, each with ``threads`` threads (extract's default on CPU: 2)


@dataclass
class BenchReport:
    backbone: str
    key: str
    input_size: int
    machine: dict
    device: str
    timings: list[Timing] = field(default_factory=list)
    decode: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)  # precision -> store key and verification
    verdict: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def best(self, engine: str, precision: str = "fp32") -> Timing | None:
        rows = [t for t in self.timings if t.engine == engine and t.precision == precision]
        return max(rows, key=lambda t: t.images_per_s, default=None)


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    line = next((line for line in _cpuinfo_lines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def machine_facts() -> dict:
    flags = cpu_flags()
    model = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    return {
        "cpu": model,
        "cores": physical_cores(),
        "python": platform.python_version(),
        "onnxruntime": distribution_version("onnxruntime"),
        "tensorflow": distribution_version("tensorflow"),
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "int8_dot_product": ", ".join(sorted(flags.intersection(VNNI_FLAGS))) or None if flags else "unknown",
    }


def time_batches(
    run: Callable[[np.ndarray], object],
    images: np.ndarray,
    batch: int,
    min_seconds: float,
    min_batches: int = 3,
    streams: int = 1,
) -> tuple[float, float, float, int]:
    """Warm up, then call ``run`` on successive batches for at least ``min_seconds`` and ``min_batches``, from
    ``streams`` threads at once: (images/s over the wall time, p50 ms, p95 ms per batch, batches timed)."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images[:batch]]
    with ThreadPoolExecutor(max_workers=streams) as pool:
        list(pool.map(run, [batches[0]] * streams))  # warm-up (every session)
        latencies: list[float] = []
        lock = threading.Lock()
        started = time.perf_counter()

        def worker(offset: int) -> None:
            k = offset
            while True:
                with lock:
                    if len(latencies) >= min_batches and time.perf_counter() - started >= min_seconds:
                        return
                t = time.perf_counter()
                run(batches[k % len(batches)])
                with lock:
                    latencies.append(time.perf_counter() - t)
                k += streams

        list(pool.map(worker, range(streams)))
        wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return batch * len(latencies) / wall, float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), len(latencies)


def decode_throughput(files: Sequence[Path], size: int, workers: int) -> tuple[float, np.ndarray]:
    """Images/s for read + decode + resize of ``files`` with ``workers`` threads (the extraction mapper), and
    the decoded images (unreadable files left out)."""
    from tlpipe.features.decoder import iter_decoded
    from tlpipe.features.sources import ImageRecord

    records = [ImageRecord(p.name, str(p), None, None) for p in files]
    started = time.perf_counter()
    pixels = [x.pixels for x in iter_decoded(records, size, "squash", workers=workers) if x.pixels is not None]
    rate = len(pixels) / (time.perf_counter() - started)
    if not pixels:
        raise InputError("none of the benchmark images could be decoded")
    return rate, np.stack(pixels)


def _photo_files(folder: Path | None, count: int, scratch: Path) -> list[Path]:
    """Up to ``count`` image files: from ``folder``, else JPEG crops of scikit-learn's bundled photos."""
    if folder is not None:
        from tlpipe.features.sources import discover

        records = discover(folder).records
        if not records:
            raise InputError(f"no images found in {folder}")
        picks = np.random.default_rng(0).permutation(len(records))[:count]
        return [Path(records[i].abspath) for i in picks]
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos, rng, files = load_sample_images().images, np.random.default_rng(0), []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = int(rng.integers(0, photo.shape[0] - 375)), int(rng.integers(0, photo.shape[1] - 480))
        path = scratch / f"photo{i:03d}.jpg"
        Image.fromarray(photo[top : top + 375, left : left + 480]).save(path, quality=90)
        files.append(path)
    return files


def _keras_runner(plan, size: int):
    from tlpipe.backbones import keras_build

    model = keras_build.build_embedding_model(plan.spec, size, plan.weights, plan.layer, plan.pooling)
    return lambda x: model(x, training=False)


def run_bench(
    backbone: str | None = None,
    *,
    choice: ModelChoice | None = None,
    images: str | os.PathLike | None = None,
    precisions: Sequence[str] = ("fp32",),
    batch_sizes: Sequence[int] = (1, 8, 32),
    threads: Sequence[int] | None = None,
    device: str = "cpu",
    keras: bool = True,
    min_seconds: float = 2.0,
    sample: int = 128,
    log: Callable[[str], None] | None = None,
    **choice_fields: Any,
) -> BenchReport:
    """Benchmark a backbone (see the module docstring); ``images`` is a folder or manifest of photos used for
    timing, decoding, and int8 calibration (default: crops of scikit-learn's bundled photos).

    The backbone is ``choice`` (its ``backbone``, ``weights``, ``weights_dir``, ``size``, ``layer``, ``pooling``,
    ``model`` and ``store``; the precisions are ``precisions``), or one made of ``backbone`` and
    ``**choice_fields`` by name (default: mobilenet_v2 with ImageNet weights)."""
    for p in precisions:
        check_precision(p)
    if not batch_sizes or min(batch_sizes) < 1:
        raise InputError("batch sizes must be positive")
    say = log or (lambda message: None)
    fields = choice_fields | ({"backbone": backbone} if backbone is not None else {})
    choice = ModelChoice.given(choice, fields, "bench", BENCH_CHOICE)
    store = choice.model_store
    precisions = ["fp32"] + [p for p in dict.fromkeys(precisions) if p != "fp32"]
    threads = sorted(set(threads or {1, physical_cores()}))
    say("resolving the backbone (exporting it if the store does not have it)…")
    entry = choice.obtain()
    size = entry.input_size
    report = BenchReport(entry.metadata.get("backbone", str(choice.backbone)), entry.key, size, machine_facts(), device)
    with tempfile.TemporaryDirectory(prefix="tlpipe-bench-") as scratch:
        files = _photo_files(Path(images) if images is not None else None, sample, Path(scratch))
        say(f"decoding {len(files)} photos…")
        workers = physical_cores() + 1
        single, _ = decode_throughput(files, size, 1)
        threaded, pixels = decode_throughput(files, size, workers)
        report.decode = {"images": len(files), "threads_1_img_s": single, f"threads_{workers}_img_s": threaded}
    entries: dict[str, StoreEntry] = {"fp32": entry}
    for precision in precisions[1:]:
        say(f"making the {precision} variant (calibrate, verify against fp32)…")
        try:
            entries[precision] = _variant(entry, precision, store, pixels)
        except VerificationError as exc:  # reported, not timed: a variant that fails its check is never used
            report.variants[precision] = {"refused": str(exc)}
            continue
        meta = entries[precision].metadata
        report.variants[precision] = {"key": entries[precision].key, **meta.get("verification_vs_fp32", {})}
    largest = max(batch_sizes)
    if len(pixels) < largest:
        pixels = np.concatenate([pixels] * (largest // len(pixels) + 1))
    cores = physical_cores()
    configs = [(1, n) for n in threads]  # (streams, threads per stream)
    if device != "cuda" and cores >= 2:
        configs.append((default_streams(), max(1, cores // default_streams())))  # what extract runs by default
    for precision, variant in entries.items():
        for streams, n in configs:
            embed = OnnxEmbedder(
                variant.model_path, device=device, threads=n, streams=streams, micro_batch=max(batch_sizes)
            )  # each batch runs whole, as timed
            for batch in batch_sizes:
                say(f"onnxruntime {precision} · {streams} x {n} threads · batch {batch}")
                rate, p50, p95, count = time_batches(embed, pixels, batch, min_seconds, streams=embed.streams)
                report.timings.append(Timing("onnxruntime", precision, batch, n, rate, p50, p95, count, embed.streams))
    if keras and distribution_version("tensorflow") is not None and choice.model is None:
        plan = choice.with_(size=size).plan()
        run = _keras_runner(plan, size)
        for batch in batch_sizes:
            say(f"keras fp32 · batch {batch}")
            rate, p50, p95, count = time_batches(run, pixels, batch, min_seconds)
            report.timings.append(Timing("keras", "fp32", batch, "tf default", rate, p50, p95, count))
    report.verdict = verdict(report)
    return report


def _variant(entry: StoreEntry, precision: str, store: ModelStore, pixels: np.ndarray) -> StoreEntry:
    from tlpipe.backbones.quantize import find_variant, make_variant

    if (found := find_variant(store, entry, precision)) is not None:
        return found
    cut = (2 * len(pixels)) // 3
    return make_variant(
        entry, precision, store, held=pixels[cut:], calibration=pixels[:cut], calibration_id=f"bench-{len(pixels)}"
    )


def verdict(report: BenchReport) -> dict:
    """The best configuration per precision, speed-ups against fp32 ONNX Runtime and Keras, and advice."""
    fp32 = report.best("onnxruntime")
    if fp32 is None:
        raise InputError("the report has no fp32 ONNX Runtime timing to compare against")
    out: dict = {"best": {}, "notes": []}
    for precision in PRECISIONS:
        best = report.best("onnxruntime", precision)
        if best is None:
            continue
        out["best"][precision] = {
            "batch": best.batch,
            "threads": best.threads,
            "streams": best.streams,
            "images_per_s": best.images_per_s,
            "vs_fp32": best.images_per_s / fp32.images_per_s,
        }
    keras = report.best("keras")
    if keras is not None:
        out["fp32_vs_keras"] = fp32.images_per_s / keras.images_per_s
        top = max(out["best"].values(), key=lambda b: b["images_per_s"])
        out["best_vs_keras"] = top["images_per_s"] / keras.images_per_s
    dot = report.machine.get("int8_dot_product")
    if "int8" in out["best"]:
        ratio = out["best"]["int8"]["vs_fp32"]
        if ratio < 1.0:
            out["notes"].append(
                f"int8 is slower than fp32 here ({ratio:.2f}x; CPU int8 dot-product instructions: "
                f"{dot or 'none'}): keep the default, fp32"
            )
        else:
            cos = report.variants.get("int8", {}).get("mean_cosine")
            out["notes"].append(
                f"int8 runs {ratio:.2f}x fp32 here (int8 dot-product: {dot or 'none'}; embeddings at mean "
                f"cosine {cos:.4f} to fp32): opt in with --precision int8; fp32 stays the default"
            )
    if "fp16" in out["best"] and report.device != "cuda":
        out["notes"].append("fp16 is for GPUs (--device cuda): CPUs run it slower than fp32")
    decode = max(v for k, v in report.decode.items() if k.endswith("img_s"))
    if decode < fp32.images_per_s:
        out["notes"].append(
            f"decoding ({decode:.0f} img/s) is slower than fp32 inference here: extraction is bound by decoding"
        )
    return out


def format_report(report: BenchReport) -> str:
    """A plain-text table of the timings followed by decode throughput and the verdict."""
    m = report.machine
    lines = [
        f"{report.backbone} @ {report.input_size}  ({report.key})",
        f"{m['cpu']}, {m['cores']} cores; int8 dot-product: {m['int8_dot_product'] or 'none'}; "
        f"onnxruntime {m['onnxruntime']}, tensorflow {m['tensorflow'] or '-'}; device {report.device}",
        "",
        f"{'engine':<12} {'precision':<9} {'batch':>5} {'streams x threads':>17} {'img/s':>9} {'p50 ms':>9} {'p95 ms':>9}",
    ]
    for t in report.timings:
        lines.append(
            f"{t.engine:<12} {t.precision:<9} {t.batch:>5} {f'{t.streams} x {t.threads}':>17} "
            f"{t.images_per_s:>9.1f} {t.p50_ms:>9.1f} {t.p95_ms:>9.1f}"
        )
    lines.append("")
    lines.append(
        "decode (read + decode + resize): "
        + ", ".join(
            f"{k.removesuffix('_img_s').replace('_', ' ')}: {v:.0f} img/s"
            for k, v in report.decode.items()
            if k.endswith("img_s")
        )
    )
    for precision, v in report.variants.items():
        if "refused" in v:
            lines.append(f"{precision} refused: {v['refused']}")
        if "mean_cosine" in v:
            lines.append(
                f"{precision} vs fp32 on {v['images']} held-out photos: mean cosine {v['mean_cosine']:.4f}, "
                f"min {v['min_cosine']:.4f}"
            )
    for precision, best in report.verdict.get("best", {}).items():
        lines.append(
            f"best {precision}: batch {best['batch']}, {best['streams']} x {best['threads']} threads, "
            f"{best['images_per_s']:.1f} img/s "
            f"({best['vs_fp32']:.2f}x fp32)"
        )
    if "fp32_vs_keras" in report.verdict:
        lines.append(
            f"fp32 ONNX Runtime vs Keras: {report.verdict['fp32_vs_keras']:.2f}x; best vs Keras: "
            f"{report.verdict['best_vs_keras']:.2f}x"
        )
    lines.extend(f"note: {n}" for n in report.verdict.get("notes", []))
    return "\n".join(lines)
