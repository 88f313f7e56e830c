"""``tlpipe suggest``: which unlabelled photos to label next (active learning on cached embeddings).

:func:`suggest` reads a cache (and a head) and returns the picks; :func:`select` is the same ranking on arrays
(the benchmark's entry point); :mod:`.report` draws the picks (contact sheet, HTML page).
"""

from .core import PICK_COLUMNS, Pick, SuggestError, SuggestResult, suggest, write_picks
from .strategies import STRATEGIES, Selection, select

__all__ = [
    "PICK_COLUMNS",
    "STRATEGIES",
    "Pick",
    "Selection",
    "SuggestError",
    "SuggestResult",
    "select",
    "suggest",
    "write_picks",
]
