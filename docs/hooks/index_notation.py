"""MkDocs hook: docstrings write shapes as ``[layer][head]``, which Markdown reads as a reference
link; mkdocs-autorefs then warns that no object ``head`` exists, and ``--strict`` fails. A
cross-reference target is always a dotted path or a heading id, so warnings for a single lower-case
word of index notation are dropped; every other warning (a real broken reference) stays."""

from __future__ import annotations

import logging
import re

_INDEX = re.compile(r"Could not find cross-reference target '[a-z_][a-z0-9_]*'$")


class _IndexNotation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _INDEX.search(record.getMessage())


def on_startup(command, dirty) -> None:
    for name in ("mkdocs.plugins.mkdocs_autorefs._internal.plugin", "mkdocs.plugins.mkdocs_autorefs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _IndexNotation) for f in logger.filters):
            logger.addFilter(_IndexNotation())
