"""Masked language modelling: 15% of tokens chosen, 80% [MASK] / 10% random / 10% kept (the
transformers collator does the masking); the output layer is tied to the word embeddings, as in BERT.

With `neighbours` the head also scores each masked token from the n-grams around it (`NeighbourScores`): an
n-gram language model beside the encoder, as the token heads read their CRF window. A small BERT from scratch
stays on MLM's unigram plateau far beyond this project's budget (MLM alone, 1,200 steps of 2,048 tokens: loss
7.8 -> 6.6 by step 300, then flat: the frequent characters, accuracy ~0.045); the neighbours carry the
local signal from the first step."""

from __future__ import annotations

import torch
from torch import nn

from tasks_mtl.config import TaskConfig
from tasks_mtl.ngrams import NgramTables, WindowFeatures, window_index

MASK_PROBABILITY = 0.15  # BERT's rate
NEIGHBOUR_DIM = 32  # width of each neighbour slot's embedding


class NeighbourScores(nn.Module):
    """Vocabulary scores of a position from its neighbours: the CRF window (`WindowFeatures`) without the slots
    that hold the position's own token (the token, the bigrams (t-1,t), (t,t+1), the centred trigram), so the
    tokens at t-2, t-1, t+1, t+2 and the bigrams (t-2,t-1), (t+1,t+2) remain; each embedded (own tables), mapped
    to the vocabulary by one linear layer (zero-initialised: the head starts from the encoder's scores)."""

    KEEP = (0, 1, 3, 4, 5, 8)  # slot numbers in WindowFeatures order

    def __init__(self, tables: NgramTables, vocab: int, dim: int = NEIGHBOUR_DIM):
        super().__init__()
        self.window = WindowFeatures(tables, vocab, dim)
        self.out = nn.Linear(len(self.KEEP) * dim, vocab, bias=False)
        with torch.no_grad():
            self.out.weight.zero_()

    def index(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, 10) window rows with the centre's slots emptied (row 0: nothing, no gradient)."""
        rows = window_index(self.window.tables[0], ids, mask)
        drop = [s for s in range(WindowFeatures.SLOTS) if s not in self.KEEP]
        rows[..., drop] = 0
        return rows

    def forward(self, rows: torch.Tensor) -> torch.Tensor:  # (..., 10) -> (..., V)
        embedded = self.window.embed(rows).unflatten(-1, (WindowFeatures.SLOTS, self.window.dim))
        return self.out(embedded[..., list(self.KEEP), :].flatten(-2))


class MaskedLMHead(nn.Module):
    """Transform (dense, GELU, LayerNorm) then a decoder whose weight *is* the word-embedding matrix."""

    def __init__(self, hidden: int, word_embeddings: nn.Embedding, neighbours: NeighbourScores | None = None):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
        self.word_embeddings = [word_embeddings]  # a list, so the shared matrix is not registered twice
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        self.neighbours = neighbours

    def forward(self, hidden_states: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) hidden states (and (..., 10) neighbour rows with `neighbours`) -> (..., V) scores."""
        weight = self.word_embeddings[0].weight  # (V, H)
        scores = nn.functional.linear(self.transform(hidden_states), weight, self.bias)
        if self.neighbours is not None:
            scores = scores + self.neighbours(rows).to(scores.dtype)
        return scores


class MaskedLMTask:
    input_columns: tuple[str, ...] = ("text",)

    def __init__(self, name: str, cfg: TaskConfig):
        self.name, self.cfg = name, cfg
        self.labels: list[str] = []

    def encode(self, batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
        return dict(tokenizer(batch["text"], truncation=True, max_length=max_length, return_special_tokens_mask=True))

    def collator(self, tokenizer, seed: int | None = None):
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=MASK_PROBABILITY, seed=seed, return_tensors="pt")

    def build_head(self, hidden: int, word_embeddings: nn.Embedding, ngrams=None, window: int = 0) -> nn.Module:
        neighbours = NeighbourScores(ngrams, word_embeddings.num_embeddings) if self.cfg.neighbours else None
        return MaskedLMHead(hidden, word_embeddings, neighbours)

    @staticmethod
    def _rows(head: MaskedLMHead, batch: dict) -> torch.Tensor | None:
        if head.neighbours is None:
            return None
        return head.neighbours.index(batch["input_ids"], batch["attention_mask"])

    def logits(self, head: MaskedLMHead, hidden_states: torch.Tensor, batch: dict) -> torch.Tensor:
        return head(hidden_states, self._rows(head, batch))  # (B, T, V)

    def masked_logits(self, head: MaskedLMHead, hidden_states: torch.Tensor, batch: dict
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, V) scores and (M,) labels of the masked positions only (the big decoder runs on those alone)."""
        selected = batch["labels"] != -100  # (B, T)
        rows = self._rows(head, batch)
        return head(hidden_states[selected], None if rows is None else rows[selected]), batch["labels"][selected]

    def loss(self, head: MaskedLMHead, hidden_states: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if not (batch["labels"] != -100).any():  # a batch of very short texts can draw no mask at all
            return hidden_states.sum() * 0.0, hidden_states.new_zeros(0, head.bias.numel())
        logits, labels = self.masked_logits(head, hidden_states, batch)  # (M, V), (M,)
        return nn.functional.cross_entropy(logits.float(), labels), logits
