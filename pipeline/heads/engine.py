"""Where the heads' parallel work runs: joblib's own backend (``local``) or Ray's joblib backend (``ray``).

``compare_heads``, ``cross_validate`` and ``fit_head(search=True)`` parallelise (head, fold) jobs with
``joblib.Parallel``; inside :func:`parallel_backend` ("ray") those jobs run as Ray tasks across the cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import joblib

from tlpipe.errors import InputError
from tlpipe.features.spec import ENGINES  # the one list of engines

__all__ = ["ENGINES", "parallel_backend"]


@contextmanager
def parallel_backend(engine: str = "local", address: str | None = None) -> Iterator[None]:
    """Run the joblib work inside the block on ``engine``.

    "local": joblib's default backend, unchanged. "ray": Ray's joblib backend on the cluster at ``address``
    (None: Ray on this machine, or the Ray this process already initialised; "auto": a running cluster);
    Ray is shut down on exit if this call started it.
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}, not {engine!r}")
    if engine == "local":
        yield
        return
    from tlpipe.features.ray_engine import ray_cluster

    with ray_cluster(address):
        from ray.util.joblib import register_ray

        register_ray()
        with joblib.parallel_backend("ray"):
            yield
