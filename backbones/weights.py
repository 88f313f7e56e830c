"""Which weights a backbone is built with: ImageNet (Keras' download), a local file, a weights directory, or none."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from tlpipe.errors import TlpipeError

from .registry import BackboneSpec

__all__ = [
    "ResolvedWeights",
    "WEIGHTS_DIR_ENV",
    "WEIGHT_SUFFIXES",
    "WeightsUnavailable",
    "candidate_filenames",
    "default_weights_dir",
    "find_in_directory",
    "offline_hint",
    "resolve_weights",
    "sha256_file",
]

WEIGHTS_DIR_ENV = "TLPIPE_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".weights.h5", ".h5")


class WeightsUnavailable(TlpipeError, RuntimeError):
    """The requested weights cannot be had (offline, missing file, wrong model)."""


@dataclass(frozen=True)
class ResolvedWeights:
    """What the Keras constructor gets, and how the choice is identified in the model-store key."""

    source: str  # "file" | "imagenet" | "none"
    path: str | None = None
    sha256: str | None = None  # of the file actually used
    seed: int = 0

    @property
    def keras_arg(self) -> str | None:
        return {"file": self.path, "imagenet": "imagenet", "none": None}[self.source]

    @property
    def identity(self) -> str:
        """Stable identity for cache keys: file hash, 'imagenet', or the init seed."""
        if self.source == "file":
            return f"sha256:{self.sha256}"
        if self.source == "none":
            return f"random:seed={self.seed}"
        return "imagenet"

    @property
    def pretrained(self) -> bool:
        return self.source != "none"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_weights_dir() -> Path | None:
    value = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(value).expanduser() if value else None


def candidate_filenames(spec: BackboneSpec, size: int) -> list[str]:
    """File names a weights directory may hold for ``spec`` at ``size``, most specific first.

    Covers tlpipe's own convention (``<family>_<alpha>_<size>_no_top.h5``, as in Keras' MobileNet
    names) and the names under which Keras itself caches its downloads.
    """
    family, alpha = spec.keras_module, spec.alpha
    names: list[str] = []
    if alpha is not None:
        alpha_text = f"{alpha:g}" if alpha != 1 else "1.0"
        names += [f"{family}_{alpha_text}_{size}_no_top", f"{spec.name}_{size}_no_top"]
        if spec.constructor == "MobileNetV2":
            names.append(f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha_text}_{size}_no_top")
        if spec.constructor == "MobileNet":
            keras_alpha = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[alpha]
            names.append(f"mobilenet_{keras_alpha}_{size}_tf_no_top")
    else:
        lower = spec.constructor.lower()
        names += [
            f"{spec.name}_{size}_no_top",
            f"{spec.name}_no_top",
            f"{spec.name}_notop",
            f"{lower}_weights_tf_dim_ordering_tf_kernels_notop",
            f"{lower}_notop",
            f"{lower}_no_top",
        ]
    return [n + suffix for n in dict.fromkeys(names) for suffix in WEIGHT_SUFFIXES]


def find_in_directory(spec: BackboneSpec, size: int, directory: str | os.PathLike) -> Path | None:
    """The weights file for ``spec`` in ``directory``; ImageNet no-top weights fit any size, so the
    default size is the fallback."""
    directory = Path(directory)
    for wanted in (size, spec.default_size, *spec.pretrained_sizes[::-1]):
        for name in candidate_filenames(spec, wanted):
            if (directory / name).is_file():
                return directory / name
    return None


def resolve_weights(
    spec: BackboneSpec,
    weights: str | os.PathLike | None = "imagenet",
    size: int | None = None,
    weights_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> ResolvedWeights:
    """Turn a user's ``--weights`` (imagenet | none | file | directory) into :class:`ResolvedWeights`.

    ``imagenet`` first looks in the weights directory (``weights_dir`` or ``$TLPIPE_WEIGHTS_DIR``),
    then leaves it to Keras (its cache, or a download).
    """
    size = size or spec.default_size
    text = "none" if weights is None else str(weights)
    if text.lower() in ("none", "random"):
        return ResolvedWeights("none", seed=seed)
    directory = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    if text.lower() == "imagenet":
        if directory is not None:
            if not directory.is_dir():
                raise WeightsUnavailable(f"weights directory {directory} does not exist")
            found = find_in_directory(spec, size, directory)
            if found is not None:
                return _from_file(found)
        return ResolvedWeights("imagenet")
    path = Path(text).expanduser()
    if path.is_dir():
        found = find_in_directory(spec, size, path)
        if found is None:
            wanted = ", ".join(candidate_filenames(spec, size)[:4])
            raise WeightsUnavailable(f"no weights for {spec.name} at {size} in {path} (looked for {wanted}, ...)")
        return _from_file(found)
    if not path.is_file():
        raise WeightsUnavailable(f"weights file {path} does not exist (use imagenet, none, a .h5 file or a directory)")
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise WeightsUnavailable(f"weights file {path} is not a Keras .h5 / .weights.h5 file")
    return _from_file(path)


def _from_file(path: Path) -> ResolvedWeights:
    return ResolvedWeights("file", path=str(path.resolve()), sha256=sha256_file(path))


def offline_hint(spec: BackboneSpec) -> str:
    return (
        f"could not download ImageNet weights for {spec.name} (offline?). Pass a local file with "
        f"--weights PATH, or put it in a weights directory (--weights-dir or ${WEIGHTS_DIR_ENV}); "
        f"file names looked for there: {', '.join(candidate_filenames(spec, spec.default_size)[:2])}"
    )
