"""Tag schemes: detection, validation of malformed sequences, conversion round trips."""

from __future__ import annotations

import pytest

from tasks_mtl.data.tagging import (
    TagSequenceError,
    convert,
    detect_scheme,
    spans_to_tags,
    tags_to_spans,
    validate_sequence,
)

BIO = ["B-PER", "I-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "B-ORG"]
BIOES = ["B-PER", "I-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC", "O", "S-ORG"]
BMES_TYPED = ["B-PER", "M-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC", "O", "S-ORG"]
SPANS = [(0, 3, "PER"), (4, 5, "LOC"), (5, 7, "LOC"), (8, 9, "ORG")]
SEGMENTATION = ["B", "E", "S", "B", "M", "M", "E", "S"]  # 北京 欢 中华人民 。
WORDS = [(0, 2, None), (2, 3, None), (3, 7, None), (7, 8, None)]


@pytest.mark.parametrize("tags,scheme", [(BIO, "bio"), (BIOES, "bioes"), (BMES_TYPED, "bmes")])
def test_typed_schemes_parse_to_the_same_spans(tags, scheme):
    assert validate_sequence(tags, scheme) is None
    assert tags_to_spans(tags, scheme) == SPANS
    assert spans_to_tags(SPANS, len(tags), scheme, typed=True) == tags


@pytest.mark.parametrize("src", ["bio", "bioes", "bmes"])
@pytest.mark.parametrize("dst", ["bio", "bioes", "bmes"])
def test_conversion_round_trips(src, dst):
    source = {"bio": BIO, "bioes": BIOES, "bmes": BMES_TYPED}[src]
    there = convert(source, src, dst)
    assert tags_to_spans(there, dst) == SPANS
    assert convert(there, dst, src) == source


def test_untyped_segmentation_renders_without_suffix():
    assert tags_to_spans(SEGMENTATION, "bmes") == WORDS
    assert convert(SEGMENTATION, "bmes", "bio") == ["B", "I", "B", "B", "I", "I", "I", "B"]
    assert convert(convert(SEGMENTATION, "bmes", "bio"), "bio", "bmes") == SEGMENTATION
    assert convert(SEGMENTATION, "bmes", "bioes") == ["B", "E", "S", "B", "I", "I", "E", "S"]


def test_bilou_letters_are_read_as_bioes():
    bilou = ["B-PER", "I-PER", "L-PER", "O", "U-LOC"]
    assert validate_sequence(bilou, "bioes") is None
    assert convert(bilou, "bioes", "bioes") == ["B-PER", "I-PER", "E-PER", "O", "S-LOC"]
    assert detect_scheme(bilou) == "bioes"


@pytest.mark.parametrize(
    "tags,scheme,reason",
    [
        (["O", "O", "O", "I-PER"], "bio", "I-PER at 3 follows O"),
        (["I-PER", "I-PER"], "bio", "I-PER at 0 starts the sequence"),  # IOB1 style
        (["B-PER", "I-LOC"], "bio", "I-LOC at 1 follows B-PER"),
        (["B-PER", "I-PER"], "bioes", "B-PER at 0 is not closed at the end"),
        (["B-PER", "O"], "bioes", "B-PER at 0 is not closed before O at 1"),
        (["E-PER"], "bioes", "E-PER at 0 starts the sequence"),
        (["B", "M", "E", "O"], "bmes", "O at 3 in untyped BMES (every character belongs to a word)"),
        (["B", "S"], "bmes", "B at 0 is not closed before S at 1"),
        (["B-PER", "E"], "bmes", "E at 1 is untyped in a typed sequence"),
        (["B-PER", "E-PER"], "bio", "tag 'E-PER' at 1 is not a BIO tag"),
        (["M-PER"], "bioes", "tag 'M-PER' at 0 is not a BIOES tag"),
    ],
)
def test_malformed_sequences_are_named(tags, scheme, reason):
    assert validate_sequence(tags, scheme) == reason
    with pytest.raises(TagSequenceError, match="at"):
        tags_to_spans(tags, scheme)


def test_all_outside_sequences():
    assert validate_sequence(["O", "O"], "bio") is None
    assert validate_sequence(["O", "O"], "bmes") is None  # typed BMES NER allows empty sentences
    assert validate_sequence(["O", "O"], "bmes", typed=False) is not None  # segmentation never has O
    assert tags_to_spans(["O", "O"], "bioes") == []
    assert convert(["O", "O"], "bio", "bmes") == ["O", "O"]


@pytest.mark.parametrize(
    "tags,scheme",
    [
        (BIO, "bio"),
        (["B-PER", "O"], "bio"),
        (BIOES, "bioes"),
        (["S-PER", "O"], "bioes"),
        (BMES_TYPED, "bmes"),
        (SEGMENTATION, "bmes"),
        (["B", "E", "S"], "bmes"),  # untyped, no O and no I: segmentation of short words
    ],
)
def test_detect_scheme(tags, scheme):
    assert detect_scheme(tags) == scheme


def test_detect_scheme_rejects_unknown_prefixes():
    with pytest.raises(ValueError, match="X"):
        detect_scheme(["B-PER", "X-PER"])


def test_spans_to_tags_rejects_bad_spans():
    with pytest.raises(ValueError, match="overlaps"):
        spans_to_tags([(0, 2, "PER"), (1, 3, "LOC")], 4, "bio", typed=True)
    with pytest.raises(ValueError, match="outside"):
        spans_to_tags([(2, 5, "PER")], 4, "bio", typed=True)
    with pytest.raises(ValueError, match="no type"):
        spans_to_tags([(0, 1, None)], 2, "bio", typed=True)
