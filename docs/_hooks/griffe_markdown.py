"""A griffe extension for the API page: tlpipe's docstrings are numpydoc with Sphinx roles, the site renders
Markdown. Before mkdocstrings renders a docstring:

- a role (``:func:`~tlpipe.x.y```, ``:class:`Name```, ...) becomes a code span of what Sphinx would show
  (``y``, ``Name``);
- ``]`` followed by ``[`` outside code spans is escaped, so text such as ``path[,label][,split]`` is not read
  as a Markdown reference link (which would send autorefs looking for a ``,split`` target);
- a paragraph ending in ``::`` (reStructuredText's "a literal block follows") ends in ``:``; the indented
  block after it is a Markdown code block already.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`<]*?)(?:\s*<([^`>]+)>)?`")
CODE = re.compile(r"(``.+?``|`[^`]+`)")


def _role(match: re.Match) -> str:
    tilde, text, target = match.groups()
    if target:  # :func:`shown <target>`
        return f"`{text.strip()}`"
    return f"`{text.rsplit('.', 1)[-1] if tilde else text}`"


def to_markdown(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = ROLE.sub(_role, line)
        parts = CODE.split(line)
        parts[::2] = [part.replace("][", "]\\[") for part in parts[::2]]
        line = "".join(parts)
        if line.rstrip().endswith("::") and line.strip() != "::":
            line = line.rstrip()[:-1]
        lines.append(line)
    return "\n".join(lines)


class SphinxToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
