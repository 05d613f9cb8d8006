"""The project's one span decoder: tags -> spans (`lenient_spans`), and spans rendered as a prediction's entities,
words or tagged words (`render_tokens`). Evaluation scores the same spans that prediction returns."""

from __future__ import annotations

from typing import Any


def lenient_spans(tags: list[str], scheme: str) -> list[tuple[int, int, str | None]]:
    """Spans (start, end exclusive, type) from predicted tags that may be ill-formed.

    B/S open a span, I/M/E continue one of the same type (or open one if none is open), E/S close it,
    O closes. Works for BIO, BIOES and BMES, typed or not.
    """
    spans: list[list] = []
    open_span = False
    for i, tag in enumerate(tags):
        prefix, _, kind = tag.partition("-")
        kind = kind or None
        if prefix == "O":
            open_span = False
            continue
        if prefix in ("B", "S") or not open_span or spans[-1][2] != kind:
            spans.append([i, i + 1, kind])
        else:
            spans[-1][1] = i + 1
        open_span = prefix not in ("E", "S", "L", "U")
    return [tuple(s) for s in spans]


def render_tokens(text: str, spans: list[tuple[int, int, str | None]], output: str) -> Any:
    """Spans over characters rendered as entities, words, or (word, tag) pairs; words join to the text."""
    if output == "spans":
        return [{"start": s, "end": e, "type": t, "text": text[s:e]} for s, e, t in spans]
    pieces: list[tuple[str, str | None]] = []
    cursor = 0
    for s, e, t in spans:
        pieces += [(ch, None) for ch in text[cursor:s]]  # characters outside any span stand alone
        pieces.append((text[s:e], t))
        cursor = e
    pieces += [(ch, None) for ch in text[cursor:]]
    if output == "words":
        return [w for w, _ in pieces]
    return [[w, t if t is not None else "x"] for w, t in pieces]
