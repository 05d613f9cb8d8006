"""The one split rule every dataset follows (sha1 of the text mod 10, as the README says).

A hash of the text, not a random draw, decides the split, so exact duplicates always land in
the same split, the split of a text never changes when other rows are added, and any tool
(DVC, a notebook, another language) can reproduce it without our code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

SPLIT_BY_BUCKET = {0: "test", 1: "validation"}  # buckets 2..9 are train: an 80/10/10 split


def text_hash(text: str) -> int:
    """sha1 of the UTF-8 bytes as an integer; also the stable sort order of prepared rows."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def split_of(text: str) -> str:
    """Split of a text: bucket 0 -> test, 1 -> validation, anything else -> train."""
    return SPLIT_BY_BUCKET.get(text_hash(text) % 10, "train")


def split_key(record: Mapping[str, Any]) -> str:
    """The text the split rule hashes: `text` (the first text of a pair) or the joined tokens."""
    if "tokens" in record:
        return "".join(record["tokens"])
    text = record["text"]
    # A null or numeric text is for validation to report; it still needs a stable split.
    return text if isinstance(text, str) else ("" if text is None else str(text))
