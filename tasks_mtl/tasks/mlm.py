"""Masked language modelling: 15% of tokens chosen, 80% [MASK] / 10% random / 10% kept (the
transformers collator does the masking); the output layer is tied to the word embeddings, as in BERT."""

from __future__ import annotations

import torch
from torch import nn

from tasks_mtl.config import TaskConfig

MASK_PROBABILITY = 0.15  # BERT's rate


class MaskedLMHead(nn.Module):
    """Transform (dense, GELU, LayerNorm) then a decoder whose weight *is* the word-embedding matrix."""

    def __init__(self, hidden: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
        self.word_embeddings = [word_embeddings]  # a list, so the shared matrix is not registered twice
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, V)
        weight = self.word_embeddings[0].weight  # (V, H)
        return nn.functional.linear(self.transform(hidden_states), weight, self.bias)


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
        return MaskedLMHead(hidden, word_embeddings)

    def logits(self, head: MaskedLMHead, hidden_states: torch.Tensor, batch: dict) -> torch.Tensor:
        return head(hidden_states)  # (B, T, V)

    def loss(self, head: MaskedLMHead, hidden_states: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]  # (B, T), -100 where not masked
        selected = labels != -100
        if not selected.any():  # a batch of very short texts can draw no mask at all
            return hidden_states.sum() * 0.0, hidden_states.new_zeros(0, head.bias.numel())
        logits = head(hidden_states[selected])  # (M, V): only masked positions go through the big decoder
        return nn.functional.cross_entropy(logits.float(), labels[selected]), logits
