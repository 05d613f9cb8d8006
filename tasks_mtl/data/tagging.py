"""Tag schemes of token tasks: BIO, BIOES (BILOU letters accepted) and BMES, typed or untyped.

Every conversion goes through spans `(start, end, type)` (end exclusive, `type` None for untyped
tags such as plain B/M/E/S segmentation), so a new scheme needs a parser and a renderer only.

Untyped spans render without a suffix in every scheme: in BIO a word is "B" then "I"s, in BMES
"S" or "B", "M"s, "E". Characters outside every span render as "O"; untyped BMES (word
segmentation) covers every character, so an "O" there is reported as malformed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Span = tuple[int, int, str | None]

# Letter of each role per scheme: begin, inside, end, single. BIO has no end/single letters.
_LETTERS = {
    "bio": {"B": "begin", "I": "inside"},
    "bioes": {"B": "begin", "I": "inside", "E": "end", "S": "single", "L": "end", "U": "single"},
    "bmes": {"B": "begin", "M": "inside", "E": "end", "S": "single"},
}
_RENDER = {  # role -> letter when writing a scheme
    "bio": {"begin": "B", "inside": "I", "end": "I", "single": "B"},
    "bioes": {"begin": "B", "inside": "I", "end": "E", "single": "S"},
    "bmes": {"begin": "B", "inside": "M", "end": "E", "single": "S"},
}
SCHEMES = tuple(_LETTERS)


class TagSequenceError(ValueError):
    """A tag sequence that is not well-formed under its scheme; the message says where."""


def split_tag(tag: str) -> tuple[str, str | None]:
    """'B-PER' -> ('B', 'PER'); 'S' -> ('S', None); 'O' -> ('O', None)."""
    prefix, sep, kind = tag.partition("-")
    return prefix, (kind if sep else None)


def detect_scheme(tags: Iterable[str]) -> str:
    """Guess the scheme of a file's tags (all sequences flattened).

    M means BMES; E/S (or L/U) without M means BIOES, except untyped tags with no O, which are
    B/E/S segmentation (BMES whose words are all 1-2 characters long); only B/I/O means BIO.
    Raises ValueError on a prefix no scheme knows.
    """
    prefixes: set[str] = set()
    typed = False
    for tag in tags:
        prefix, kind = split_tag(tag)
        prefixes.add(prefix)
        typed = typed or kind is not None
    unknown = prefixes - {"O", "B", "I", "M", "E", "S", "L", "U"}
    if unknown:
        raise ValueError(f"unknown tag prefix(es) {sorted(unknown)}; expected BIO, BIOES/BILOU or BMES")
    if "M" in prefixes:
        return "bmes"
    if prefixes & {"E", "S", "L", "U"}:
        return "bmes" if not typed and "O" not in prefixes and "I" not in prefixes else "bioes"
    return "bio"


def validate_sequence(tags: Sequence[str], scheme: str, typed: bool | None = None) -> str | None:
    """None when `tags` is well-formed under `scheme`, else a short reason naming the position.

    `typed` says whether the task's tags carry types; None infers it from the sequence. In
    BMES an "O" is allowed only in typed sequences (untyped BMES is segmentation: every
    character belongs to a word); pass typed=False to forbid it even in an all-O sequence.
    """
    if scheme not in _LETTERS:
        raise ValueError(f"unknown tag scheme {scheme!r}; use one of {SCHEMES}")
    letters = _LETTERS[scheme]
    parsed = [split_tag(t) for t in tags]
    if typed is None:
        typed = any(kind is not None for _, kind in parsed) or not any(p != "O" for p, _ in parsed)
    open_kind: str | None = None  # type of the span still open at the previous position
    open_at = -1  # position of the open span's begin (or -1 when none is open)
    for i, (tag, (prefix, kind)) in enumerate(zip(tags, parsed)):
        if prefix == "O":
            if kind is not None:
                return f"malformed tag {tag!r} at {i}"
            if scheme == "bmes" and not typed:
                return f"O at {i} in untyped BMES (every character belongs to a word)"
            if open_at >= 0 and scheme != "bio":
                return f"{tags[open_at]} at {open_at} is not closed before O at {i}"
            open_at = -1
            continue
        role = letters.get(prefix)
        if role is None:
            return f"tag {tag!r} at {i} is not a {scheme.upper()} tag"
        if (kind is not None) != typed:
            mismatch = "untyped in a typed" if kind is None else "typed in an untyped"
            return f"{tag} at {i} is {mismatch} sequence"
        if role in ("begin", "single"):
            if open_at >= 0 and scheme != "bio":
                return f"{tags[open_at]} at {open_at} is not closed before {tag} at {i}"
            open_at, open_kind = (i, kind) if role == "begin" else (-1, None)
            continue
        # inside / end: continue a span of the same type
        if open_at < 0:
            return f"{tag} at {i} starts the sequence" if i == 0 else f"{tag} at {i} follows {tags[i - 1]}"
        if kind != open_kind:
            return f"{tag} at {i} follows {tags[i - 1]}"
        if role == "end":
            open_at = -1
    if open_at >= 0 and scheme != "bio":
        return f"{tags[open_at]} at {open_at} is not closed at the end"
    return None


def tags_to_spans(tags: Sequence[str], scheme: str) -> list[Span]:
    """Spans of a well-formed sequence; raises TagSequenceError (with the reason) otherwise."""
    reason = validate_sequence(tags, scheme, typed=None)
    if reason is not None:
        raise TagSequenceError(reason)
    letters = _LETTERS[scheme]
    spans: list[Span] = []
    start = -1
    for i, tag in enumerate(tags):
        prefix, kind = split_tag(tag)
        role = letters.get(prefix)  # None for O
        if start >= 0 and role in (None, "begin", "single"):  # BIO spans end implicitly
            spans.append((start, i, split_tag(tags[start])[1]))
            start = -1
        if role == "begin":
            start = i
        elif role == "single":
            spans.append((i, i + 1, kind))
        elif role == "end":
            spans.append((start, i + 1, kind))
            start = -1
    if start >= 0:
        spans.append((start, len(tags), split_tag(tags[start])[1]))
    return spans


def spans_to_tags(spans: Iterable[Span], n: int, scheme: str, typed: bool) -> list[str]:
    """Render non-overlapping spans over `n` positions; positions outside every span get "O"."""
    if scheme not in _RENDER:
        raise ValueError(f"unknown tag scheme {scheme!r}; use one of {SCHEMES}")
    render = _RENDER[scheme]
    tags = ["O"] * n
    covered = 0  # end of the previous span: spans are sorted, so an overlap starts before it
    for start, end, kind in sorted(spans, key=lambda span: span[:2]):
        if not 0 <= start < end <= n:
            raise ValueError(f"span {(start, end, kind)} is outside 0..{n}")
        if start < covered:
            raise ValueError(f"span {(start, end, kind)} overlaps another span")
        covered = end
        if typed and kind is None:
            raise ValueError(f"span {(start, end)} has no type but typed tags were asked for")
        suffix = f"-{kind}" if typed else ""
        if end - start == 1:
            tags[start] = render["single"] + suffix
            continue
        tags[start] = render["begin"] + suffix
        tags[start + 1 : end - 1] = [render["inside"] + suffix] * (end - start - 2)
        tags[end - 1] = render["end"] + suffix
    return tags


def convert(tags: Sequence[str], src: str, dst: str) -> list[str]:
    """Re-tag a well-formed sequence from scheme `src` to `dst` (typed stays typed)."""
    spans = tags_to_spans(tags, src)
    typed = any(kind is not None for _, _, kind in spans)
    return spans_to_tags(spans, len(tags), dst, typed=typed)


def scheme_prefixes(scheme: str) -> frozenset[str]:
    """Tag prefixes a scheme accepts, "O" included (BIOES also takes BILOU's L and U)."""
    return frozenset({"O", *_LETTERS[scheme]})
