"""Scoring and deployment: batch predictions for images or a cache (:mod:`.score`, :mod:`.score_ray` on Ray),
and the fused backbone + head classifier (:mod:`.fuse`, ``tlpipe export-model``)."""

__all__: list[str] = []
