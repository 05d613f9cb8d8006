"""The split rule: sha1(text) mod 10, so duplicates never straddle splits."""

from __future__ import annotations

import hashlib
from collections import Counter

from tasks_mtl.data.split import split_key, split_of


def _bucket(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 10


def test_split_follows_the_contract_buckets():
    texts = [f"句子{i}" for i in range(300)]
    expected = {0: "test", 1: "validation"}
    for text in texts:
        assert split_of(text) == expected.get(_bucket(text), "train")
    # all three splits occur on a few hundred texts, so the mapping above was exercised
    assert {split_of(t) for t in texts} == {"train", "validation", "test"}


def test_split_is_about_80_10_10():
    counts = Counter(split_of(f"评论 {i}") for i in range(5000))
    assert 0.77 < counts["train"] / 5000 < 0.83
    assert 0.08 < counts["test"] / 5000 < 0.12
    assert 0.08 < counts["validation"] / 5000 < 0.12


def test_duplicates_share_a_split_and_known_values_are_pinned():
    assert split_of("很喜欢") == split_of("很" + "喜欢")
    # pinned values: hashing another encoding (GBK, UTF-16) or another hash would move these
    assert split_of("文本34") == "test"
    assert split_of("文本11") == "validation"
    assert split_of("中国人民很高兴。") == "train"


def test_split_key_uses_first_text_and_joined_tokens():
    assert split_key({"text": "甲", "text_pair": "乙", "label": "is_next"}) == "甲"
    assert split_key({"tokens": ["北京", "欢迎", "你"], "tags": ["O"] * 3}) == "北京欢迎你"
    assert split_of(split_key({"tokens": list("北京欢迎你")})) == split_of("北京欢迎你")
    assert split_key({"text": None}) == ""
