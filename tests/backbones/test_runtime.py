"""ONNX Runtime sessions: explicit provider checks (strict cuda, auto fallback), one-build rule, GPU proof."""

import numpy as np
import pytest

import tlpipe.backbones.runtime as runtime
from tlpipe.backbones.runtime import OnnxEmbedder, ProviderError, create_session


def has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_session(tiny_entry):
    session = create_session(tiny_entry.model_path, device="cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]
    embed = OnnxEmbedder(tiny_entry.model_path, device="cpu")
    out = embed(np.zeros((2, 64, 64, 3), np.uint8))
    assert out.shape == (2, tiny_entry.embedding_dim) and embed.input_size == 64
    with pytest.raises(ValueError, match="uint8"):
        embed(np.zeros((2, 64, 64, 3), np.float32))


def test_device_validation(tiny_entry):
    with pytest.raises(ValueError, match="device"):
        create_session(tiny_entry.model_path, device="tpu")


@pytest.mark.skipif("has_cuda()", reason="this machine has CUDA: strictness is tested by test_cuda_session")
def test_cuda_is_strict_without_cuda(tiny_entry):
    with pytest.raises(ProviderError, match="no CUDA provider"):
        create_session(tiny_entry.model_path, device="cuda")
    assert create_session(tiny_entry.model_path, device="auto").get_providers() == ["CPUExecutionProvider"]


def test_two_onnxruntime_builds_are_refused(tiny_entry, monkeypatch):
    monkeypatch.setattr(runtime, "installed_onnxruntime_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(ProviderError, match="uninstall all but one"):
        create_session(tiny_entry.model_path, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif("not has_cuda()", reason="no CUDA provider in this ONNX Runtime (CI has no GPU)")
def test_cuda_session(tiny_entry):
    gpu = OnnxEmbedder(tiny_entry.model_path, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    images = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    cpu = OnnxEmbedder(tiny_entry.model_path, device="cpu")
    assert np.allclose(gpu(images), cpu(images), atol=1e-3)


def test_streams_run_side_by_side_and_agree(tiny_entry):
    from concurrent.futures import ThreadPoolExecutor

    images = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    one = OnnxEmbedder(tiny_entry.model_path, device="cpu")
    two = OnnxEmbedder(tiny_entry.model_path, device="cpu", streams=2, threads=1)
    assert (one.streams, two.streams) == (1, 2)
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(two, [images[i : i + 3] for i in range(0, 12, 3)]))
    np.testing.assert_allclose(np.concatenate(parts), one(images), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="streams"):
        OnnxEmbedder(tiny_entry.model_path, device="cpu", streams=0)


def test_micro_batches_give_the_whole_batch_result(tiny_entry):
    images = np.random.default_rng(1).integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    whole = OnnxEmbedder(tiny_entry.model_path, device="cpu", micro_batch=64)
    chunked = OnnxEmbedder(tiny_entry.model_path, device="cpu", micro_batch=3)
    assert OnnxEmbedder(tiny_entry.model_path, device="cpu").micro_batch == runtime.CPU_MICRO_BATCH
    np.testing.assert_allclose(chunked(images), whole(images), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="micro_batch"):
        OnnxEmbedder(tiny_entry.model_path, device="cpu", micro_batch=0)


MIXED_CHILD = """
import sys
from tlpipe.backbones.runtime import ProviderError, create_session
try:
    print(create_session(sys.argv[1], device="cpu").get_providers()[0])
except ProviderError as exc:
    print("refused:", exc)
"""


def test_mixed_builds_override_for_a_deliberate_shadowing_layout(tiny_entry, tmp_path):
    """The lent GPU machines put onnxruntime-gpu on PYTHONPATH before the image's CPU build, so both
    distributions are visible to importlib.metadata: refused by default, accepted with the documented override."""
    import os
    import subprocess
    import sys

    shadow = tmp_path / "site"
    info = shadow / "onnxruntime_gpu-1.31.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    env.pop(runtime.MIXED_BUILDS_ENV, None)

    def run(**extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", MIXED_CHILD, str(tiny_entry.model_path)],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    refused = run()
    assert refused.startswith("refused:") and "onnxruntime-gpu" in refused and runtime.MIXED_BUILDS_ENV in refused
    assert run(**{runtime.MIXED_BUILDS_ENV: "1"}) == "CPUExecutionProvider"
