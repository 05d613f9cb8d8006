"""Sequence classification from a pooled vector (sentiment), and its pair variant (nsp)."""

from __future__ import annotations

import torch
from torch import nn

from tasks_mtl.config import TaskConfig
from tasks_mtl.ngrams import NgramBag, NgramTables


class ClassificationHead(nn.Module):
    """Pool the text ([CLS] vector, or the masked mean of all tokens), dense + tanh as BERT's pooler, then a
    linear classifier; with an n-gram bag, the bag's vector is concatenated to the pooled one first."""

    def __init__(self, hidden: int, num_labels: int, pooling: str = "cls", bag: NgramBag | None = None,
                 dropout: float = 0.1):
        super().__init__()
        self.pooling = pooling
        self.pool = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.bag = bag
        self.classify = nn.Linear(hidden + (bag.unigrams.embedding_dim if bag is not None else 0), num_labels)

    def forward(self, hidden_states: torch.Tensor, batch: dict) -> torch.Tensor:  # (B, T, H) -> (B, C)
        mask = batch["attention_mask"]  # (B, T)
        if self.pooling == "mean":
            weights = mask[..., None].to(hidden_states.dtype)
            vector = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, H)
        else:
            vector = hidden_states[:, 0]  # (B, H)
        features = self.dropout(torch.tanh(self.pool(vector)))
        if self.bag is not None:
            features = torch.cat([features, self.bag(batch["input_ids"], mask).to(features.dtype)], dim=-1)
        return self.classify(features)


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

    def build_head(self, hidden: int, word_embeddings: nn.Embedding, ngrams: NgramTables | None = None) -> nn.Module:
        bag = NgramBag(ngrams, word_embeddings.num_embeddings, self.cfg.ngram_bag) if self.cfg.ngram_bag else None
        return ClassificationHead(hidden, len(self.labels), self.cfg.pooling, bag)

    def logits(self, head: nn.Module, hidden_states: torch.Tensor, batch: dict) -> torch.Tensor:
        return head(hidden_states, batch)  # (B, C)

    def loss(self, head: nn.Module, hidden_states: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(hidden_states, batch)  # (B, C)
        return nn.functional.cross_entropy(logits.float(), batch["labels"]), logits


class PairClassificationTask(ClassificationTask):
    """Classification of a text pair encoded as [CLS] a [SEP] b [SEP] (e.g. next-sentence prediction)."""

    input_columns = ("text", "text_pair", "label")

    def encode(self, batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
        enc = tokenizer(batch["text"], batch["text_pair"], truncation="longest_first", max_length=max_length)
        enc["labels"] = [self.label2id[label] for label in batch["label"]]
        return dict(enc)
