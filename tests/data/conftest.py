"""Tiny raw corpora in the layout `mtl ingest` writes, for fast data-layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

# Three paragraphs: 3 + 2 + 1 sentences. Line 1 holds a split name (江/nr 泽民/nr), an ORG and
# a sentence without a final mark; line 2 cuts at ？ and 。; line 3 is a single sentence.
PEOPLES_DAILY = (
    "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  。/w  国家/n  主席/n  江/nr  泽民/nr  发表/v  讲话/n  ！/w  "
    "（/w  新华社/nt  记者/n  兰/nr  红光/nr  摄/Vg  ）/w\n"
    "北京/ns  欢迎/v  你/r  ？/w  中国/ns  人民/n  很/d  高兴/a  。/w\n"
    "同胞/n  们/k  、/w\n"
)
NEGATIVE = "质量太差了\n不喜欢\n不喜欢\n一般般\n"  # a duplicate, and a text that is also positive
POSITIVE = "非常好用\n很喜欢\n一般般\n"


def write_raw(root: Path) -> Path:
    raw = root / "data"
    (raw / "sentiment").mkdir(parents=True, exist_ok=True)
    (raw / "peoples_daily").mkdir(parents=True, exist_ok=True)
    (raw / "sentiment" / "neg.txt").write_text(NEGATIVE, encoding="utf-8")
    (raw / "sentiment" / "pos.txt").write_text(POSITIVE, encoding="utf-8")
    (raw / "peoples_daily" / "199801.txt").write_text(PEOPLES_DAILY, encoding="utf-8")
    return raw


@pytest.fixture
def tiny_raw(tmp_path: Path) -> Path:
    """A raw directory (tmp_path/data) with handcrafted sentiment and People's Daily files."""
    return write_raw(tmp_path)
