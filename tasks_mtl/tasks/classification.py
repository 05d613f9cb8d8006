"""Sequence classification from a pooled vector (sentiment), and its pair variant (nsp)."""

from __future__ import annotations

import torch
from torch import nn

from tasks_mtl.config import TaskConfig
from tasks_mtl.ngrams import NgramBag, NgramTables, pair_overlap
from tasks_mtl.tfidf import TfidfScores


def masked_mean(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): the mean over the positions where mask is set."""
    weights = mask[..., None].to(hidden_states.dtype)
    return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)


class ClassificationHead(nn.Module):
    """Pool the text, dense + tanh as BERT's pooler, then a linear classifier.

    Pooling: `cls` (the [CLS] vector), `mean` (masked mean of all tokens), or `pair` for text pairs:
    the means u, v of the two segments (token_type_ids 0 and 1) as [u, v, |u - v|, u * v], so the head
    compares the two texts directly. An n-gram bag adds its vector of the text (or, under `pair`, the
    product and difference of the two segments' bags) before the classifier; under `pair`, `overlap_vocab`
    adds the two texts' char n-gram overlap (`tasks_mtl.ngrams.pair_overlap`). `tfidf` adds the text's TF-IDF
    class scores to the logits (`tasks_mtl.tfidf`), the head's own logits weighted by `own_weight` (1 while it
    trains; the last stage may choose a lower one on validation: `tasks_mtl.tfidf.choose_own_weight`)."""

    def __init__(self, hidden: int, num_labels: int, pooling: str = "cls", bag: NgramBag | None = None,
                 dropout: float = 0.1, overlap_vocab: int = 0, tfidf: TfidfScores | None = None):
        super().__init__()
        self.pooling = pooling
        parts = 4 if pooling == "pair" else 1
        self.pool = nn.Linear(parts * hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.bag = bag
        self.overlap_vocab = overlap_vocab  # > 0: the pair's n-gram overlap (3 features) reaches the classifier
        bag_dim = bag.unigrams.embedding_dim * (2 if pooling == "pair" else 1) if bag is not None else 0
        self.classify = nn.Linear(hidden + bag_dim + (3 if overlap_vocab else 0), num_labels)
        self.tfidf = tfidf
        if tfidf is not None:  # a buffer: saved with the head (checkpoints from before it load it as 1)
            self.register_buffer("own_weight", torch.ones(()))

    def forward(self, hidden_states: torch.Tensor, batch: dict) -> torch.Tensor:  # (B, T, H) -> (B, C)
        own, tfidf = self.parts(hidden_states, batch)
        return own if tfidf is None else self.combine(own, tfidf.to(own.dtype))

    def combine(self, own: torch.Tensor, tfidf: torch.Tensor) -> torch.Tensor:
        """(B, C) logits from the two parts: the TF-IDF scores plus `own_weight` times the head's own logits."""
        return tfidf + self.own_weight.to(own.dtype) * own

    def parts(self, hidden_states: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C) logits of the pooled vector (with bag and overlap), and (B, C) TF-IDF scores or None."""
        mask = batch["attention_mask"].bool()  # (B, T)
        if self.pooling == "pair":
            second = batch["token_type_ids"].bool() & mask  # (B, T)
            first = mask & ~second
            u, v = masked_mean(hidden_states, first), masked_mean(hidden_states, second)  # (B, H) each
            vector = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)  # (B, 4H)
        elif self.pooling == "mean":
            vector = masked_mean(hidden_states, mask)  # (B, H)
        else:
            vector = hidden_states[:, 0]  # (B, H)
        features = self.dropout(torch.tanh(self.pool(vector)))
        if self.bag is not None:
            ids = batch["input_ids"]
            if self.pooling == "pair":
                a, b = self.bag(ids, first), self.bag(ids, second)  # (B, D) each
                bags = torch.cat([a * b, (a - b).abs()], dim=-1)  # (B, 2D)
            else:
                bags = self.bag(ids, mask)  # (B, D)
            features = torch.cat([features, bags.to(features.dtype)], dim=-1)
        if self.overlap_vocab:
            overlap = pair_overlap(batch["input_ids"], first, second, self.overlap_vocab)  # (B, 3)
            features = torch.cat([features, overlap.to(features.dtype)], dim=-1)
        logits = self.classify(features)
        return logits, (self.tfidf(batch["input_ids"], mask) if self.tfidf is not None else None)


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

    def build_head(self, hidden: int, word_embeddings: nn.Embedding, ngrams: NgramTables | None = None,
                   window: int = 0) -> nn.Module:
        bag = None
        if self.cfg.ngram_bag:
            bag = NgramBag(ngrams, word_embeddings.num_embeddings, self.cfg.ngram_bag, norm=self.cfg.ngram_bag_norm)
        overlap = word_embeddings.num_embeddings if self.cfg.pair_overlap else 0
        tfidf = TfidfScores(ngrams, word_embeddings.num_embeddings, len(self.labels)) if self.cfg.tfidf else None
        return ClassificationHead(hidden, len(self.labels), self.cfg.pooling, bag, overlap_vocab=overlap, tfidf=tfidf)

    def logits(self, head: nn.Module, hidden_states: torch.Tensor, batch: dict) -> torch.Tensor:
        return head(hidden_states, batch)  # (B, C)

    def loss(self, head: nn.Module, hidden_states: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        own, tfidf = head.parts(hidden_states, batch)  # (B, C) each
        if tfidf is None:
            return nn.functional.cross_entropy(own.float(), batch["labels"]), own
        logits = head.combine(own.float(), tfidf.float())
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        if self.cfg.encoder_loss:  # a fitted regression leaves small residuals: the encoder would learn little
            loss = loss + nn.functional.cross_entropy(own.float(), batch["labels"])
        return loss, logits


class PairClassificationTask(ClassificationTask):
    """Classification of a text pair encoded as [CLS] a [SEP] b [SEP] (e.g. next-sentence prediction)."""

    input_columns = ("text", "text_pair", "label")

    def encode(self, batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
        enc = tokenizer(batch["text"], batch["text_pair"], truncation="longest_first", max_length=max_length)
        enc["labels"] = [self.label2id[label] for label in batch["label"]]
        return dict(enc)
