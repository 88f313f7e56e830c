"""The audit of a cached feature set before any head is trained: exact and near duplicates, leaks across
splits, suspected label errors, outliers (:mod:`.checks`). Rendering lives in :mod:`tlpipe.pipeline.reports`."""

__all__: list[str] = []
