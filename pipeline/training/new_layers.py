"""The small layer language of `tlpipe custom-model`: the new layers trained on a cut point's feature maps.

One spelling, comma-separated tokens in order (:data:`NEW_LAYERS_HELP`), e.g.
``conv:128,pool,conv:256,pool,gap,dense:64,bn,dropout:0.3``. Parsing needs no TensorFlow, so the CLI's
help and its errors come from here; :mod:`tlpipe.pipeline.training.custom_model` builds the Keras layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tlpipe.errors import InputError

__all__ = ["NEW_LAYERS_HELP", "NewLayer", "parse_new_layers"]

NEW_LAYERS_HELP = (
    "comma-separated, in order: conv:F (F filters, 3x3, same padding, ReLU; conv:F:K for K x K), "
    "pool (2x2 max pooling), gap | gmp | flatten (feature map -> vector: global average / max pooling, or "
    "flatten; exactly one, after every conv and pool and before every dense), dense:N (N units, ReLU), "
    "bn (batch normalisation, momentum 0.9), dropout:R (0 <= R < 1). The softmax over the classes is added at the end. "
    "Example: conv:128,pool,conv:256,pool,gap,dense:64,bn,dropout:0.3"
)
SPATIAL, VECTOR = ("conv", "pool"), ("gap", "gmp", "flatten")


@dataclass(frozen=True)
class NewLayer:
    """One token of the layer language: ``kind`` (conv, pool, gap, gmp, flatten, dense, bn, dropout)."""

    kind: str
    units: int = 0  # conv filters, dense units
    kernel: int = 3  # conv kernel side
    rate: float = 0.0  # dropout rate
    token: str = ""


def parse_new_layers(spec: str) -> list[NewLayer]:
    """Parse the layer language (:data:`NEW_LAYERS_HELP`) into layers.

    Raises
    ------
    ValueError
        Naming the bad token and its position: an unknown kind, a bad number, a conv/pool after the feature
        map became a vector, a dense before it, or not exactly one of gap / gmp / flatten.
    """
    tokens = [t.strip() for t in spec.split(",")]
    if not spec.strip():
        raise InputError(f"new layers: empty; {NEW_LAYERS_HELP}")
    layers: list[NewLayer] = []
    vector_at = None
    for i, token in enumerate(tokens, 1):

        def bad(reason: str, i: int = i, token: str = token) -> InputError:
            return InputError(f"new layers {spec!r}: token {i} {token!r}: {reason}")

        kind, *args = token.lower().split(":")
        if kind in ("conv", "dense"):
            if not 1 <= len(args) <= (2 if kind == "conv" else 1):
                usage = "conv:FILTERS or conv:FILTERS:KERNEL" if kind == "conv" else "dense:UNITS"
                raise bad(f"write it as {usage}")
            try:
                numbers = [int(a) for a in args]
            except ValueError:
                raise bad("the sizes must be whole numbers") from None
            if min(numbers) < 1:
                raise bad("the sizes must be at least 1")
            layer = NewLayer(kind, numbers[0], numbers[1] if len(numbers) > 1 else 3, token=token)
        elif kind == "dropout":
            try:
                rate = float(args[0]) if len(args) == 1 else math.nan
            except ValueError:
                rate = math.nan
            if not 0 <= rate < 1:
                raise bad("write it as dropout:RATE with 0 <= RATE < 1")
            layer = NewLayer(kind, rate=rate, token=token)
        elif kind in ("pool", "bn", *VECTOR):
            if args:
                raise bad(f"{kind} takes no argument")
            layer = NewLayer(kind, token=token)
        else:
            raise bad("unknown layer; use conv, pool, gap, gmp, flatten, dense, bn or dropout")
        if kind in SPATIAL and vector_at is not None:
            raise bad(f"a {kind} needs a feature map, but token {vector_at} already made it a vector")
        if kind == "dense" and vector_at is None:
            raise bad("a dense layer needs a vector: put gap, gmp or flatten before it")
        if kind in VECTOR:
            if vector_at is not None:
                raise bad(f"the feature map is already a vector (token {vector_at})")
            vector_at = i
        layers.append(layer)
    if vector_at is None:
        raise InputError(
            f"new layers {spec!r}: no gap, gmp or flatten: the feature map must become a vector before the softmax"
        )
    return layers
