"""Reports: rendering only. Every function here takes a computed result and writes files (Markdown, CSV,
JSON, PNG); none recomputes a metric. Images are found from the cache's recorded sources by
:func:`.images.resolve_image`, so a report shows its images whoever calls it."""

__all__: list[str] = []
