"""`tlpipe bench`: a real sweep on a tiny backbone (ONNX Runtime fp32 + int8, Keras, decoding), table and JSON."""

import json

import numpy as np
import pytest

from tests.pipeline.cli.test_commands import tlpipe
from tlpipe.pipeline.bench import BenchReport, Timing, format_report, machine_facts, run_bench, time_batches, verdict


def test_time_batches_counts_every_timed_call():
    calls = []
    rate, p50, p95, n = time_batches(calls.append, np.zeros((10, 2)), batch=4, min_seconds=0.0, min_batches=5)
    assert n == 5 and len(calls) == 6  # one warm-up
    assert rate > 0 and 0 <= p50 <= p95


def test_time_batches_from_several_streams_at_once():
    import threading
    import time

    active, peak, lock = [0], [0], threading.Lock()

    def run(x):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1

    rate, p50, _, n = time_batches(run, np.zeros((8, 2)), batch=2, min_seconds=0.1, streams=2)
    assert peak[0] == 2 and n >= 3
    assert rate > 1.5 * 2 / (p50 / 1000)  # two batches in flight: about twice one stream's rate


def test_sweep_on_a_tiny_backbone(model_store, tiny_entry):
    report = run_bench(
        "mobilenet_v2_0.35",
        weights="none",
        size=64,
        store=model_store,
        precisions=["int8"],
        batch_sizes=[1, 4],
        threads=[1, 2],
        min_seconds=0.05,
        sample=24,
    )
    assert report.key == tiny_entry.key
    from tlpipe.backbones.runtime import default_streams, physical_cores

    onnx_rows = [t for t in report.timings if t.engine == "onnxruntime"]
    configs = {(1, 1), (1, 2)} | (
        {(default_streams(), physical_cores() // default_streams())} if physical_cores() >= 2 else set()
    )
    assert {(t.precision, t.batch, t.streams, t.threads) for t in onnx_rows} == {
        (p, b, s, n) for p in ("fp32", "int8") for b in (1, 4) for s, n in configs
    }
    keras_rows = [t for t in report.timings if t.engine == "keras"]
    assert [t.batch for t in keras_rows] == [1, 4]
    assert all(t.images_per_s > 0 and t.p50_ms <= t.p95_ms and t.batches >= 3 for t in report.timings)
    assert report.decode["images"] == 24 and report.decode["threads_1_img_s"] > 0
    assert report.variants["int8"]["mean_cosine"] >= 0.99
    assert report.verdict["best"]["fp32"]["vs_fp32"] == 1.0 and "fp32_vs_keras" in report.verdict
    assert any("int8" in note for note in report.verdict["notes"])
    text = format_report(report)
    assert "p95 ms" in text and "best int8" in text and "decode" in text


def _report(int8_rate: float, vnni: str | None) -> BenchReport:
    machine = {**machine_facts(), "int8_dot_product": vnni}
    report = BenchReport(
        "b",
        "k",
        224,
        machine,
        "cpu",
        decode={"images": 8, "threads_1_img_s": 1000.0},
        variants={"int8": {"mean_cosine": 0.995}},
    )
    report.timings = [
        Timing("onnxruntime", "fp32", 8, 2, 100.0, 1, 2, 3),
        Timing("onnxruntime", "int8", 8, 2, int8_rate, 1, 2, 3),
    ]
    return report


def test_verdict_says_when_int8_is_slower_and_keeps_fp32():
    slow = verdict(_report(70.0, None))
    assert slow["best"]["int8"]["vs_fp32"] == pytest.approx(0.7)
    assert any("slower than fp32" in n and "keep the default" in n for n in slow["notes"])
    fast = verdict(_report(180.0, "avx512_vnni"))
    assert any("1.80x" in n and "--precision int8" in n for n in fast["notes"])


def test_cli_json_and_bad_input(tmp_path, model_store, tiny_entry):
    proc = tlpipe(
        "bench",
        "--backbone",
        "mobilenet_v2_0.35",
        "--weights",
        "none",
        "--size",
        "64",
        "--batch",
        "2",
        "--threads",
        "1",
        "--seconds",
        "0",
        "--no-keras",
        "--json",
        "--store",
        model_store.root,
        check=True,
    )
    data = json.loads(proc.stdout)
    assert data["key"] == tiny_entry.key and {
        (t["batch"], t["threads"]) for t in data["timings"] if t["streams"] == 1
    } == {(2, 1)}
    bad = tlpipe(
        "bench",
        "--backbone",
        "mobilenet_v2_0.35",
        "--weights",
        "none",
        "--size",
        "64",
        "-p",
        "int4",
        "--store",
        model_store.root,
    )
    assert bad.returncode == 2 and "precision" in bad.stderr
