"""Sequence classification from the [CLS] vector (sentiment), and its pair variant (nsp)."""

from __future__ import annotations

import torch
from torch import nn

from tasks_mtl.config import TaskConfig


class ClassificationHead(nn.Module):
    """BERT-style pooler (dense + tanh over [CLS]) then a linear classifier."""

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.pool = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classify = nn.Linear(hidden, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, C)
        pooled = torch.tanh(self.pool(hidden_states[:, 0]))  # (B, H)
        return self.classify(self.dropout(pooled))


class ClassificationTask:
    """Single-text classification; labels are strings from the declared label set."""

    input_columns: tuple[str, ...] = ("text", "label")

    def __init__(self, name: str, cfg: TaskConfig):
        self.name, self.cfg = name, cfg
        self.labels = list(cfg.labels)
        self.label2id = {label: i for i, label in enumerate(self.labels)}

    def encode(self, batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        enc["labels"] = [self.label2id[label] for label in batch["label"]]
        return dict(enc)

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def build_head(self, hidden: int, word_embeddings: nn.Embedding) -> nn.Module:
        return ClassificationHead(hidden, len(self.labels))

    def loss(self, head: nn.Module, hidden_states: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(hidden_states)  # (B, C)
        return nn.functional.cross_entropy(logits.float(), batch["labels"]), logits


class PairClassificationTask(ClassificationTask):
    """Classification of a text pair encoded as [CLS] a [SEP] b [SEP] (e.g. next-sentence prediction)."""

    input_columns = ("text", "text_pair", "label")

    def encode(self, batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
        enc = tokenizer(batch["text"], batch["text_pair"], truncation="longest_first", max_length=max_length)
        enc["labels"] = [self.label2id[label] for label in batch["label"]]
        return dict(enc)
