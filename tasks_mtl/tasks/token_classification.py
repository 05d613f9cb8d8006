"""Token classification (NER, segmentation, POS) with an optional CRF over the emissions.

A row is `tokens` (characters for Chinese, or words) with one tag each. The tokenizer may split
a token into several word pieces; its tag goes to the first piece and the rest are ignored
(-100), so one-character-one-token and word-piece tokens are aligned the same way. Rows longer
than the window become several windows (overflow), so no tag is lost in training.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from tasks_mtl import chain
from tasks_mtl.config import TaskConfig
from tasks_mtl.ngrams import WindowTagWeights

IGNORE = -100


def first_piece_labels(word_ids: list[int | None], tags: list[str], label2id: dict[str, int]) -> list[int]:
    """Label id on the first word piece of each token, IGNORE elsewhere (specials, later pieces)."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE if word is None or word == previous else label2id[tags[word]])
        previous = word
    return labels


def pack_first_pieces(values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather positions whose label is not IGNORE to the left: (B, T, ...) -> (B, W, ...) and a (B, W) mask."""
    keep = labels != IGNORE  # (B, T)
    counts = keep.sum(1)  # (B,)
    width = max(int(counts.max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept positions first, in order
    index = order.view(*order.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    packed = values.gather(1, index)  # (B, W, ...)
    mask = torch.arange(width, device=values.device)[None, :] < counts[:, None]  # (B, W)
    return packed, mask


@functools.cache  # one class for every head (torchcrf is imported only when a task uses a CRF)
def _crf_class():
    from torchcrf import CRF

    class MatmulCRF(CRF):
        """torchcrf's CRF with the log-partition computed as one (B, C) x (C, C) matrix product per position
        in shifted exp space, instead of building and reducing a (B, C, C) tensor: the same value (to float
        rounding) at a fraction of the time and memory for tag sets like POS's 89 tags; the gold path's score
        in one vectorised pass instead of a loop over positions."""

        def _compute_score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # emissions (T, B, C), tags and mask (T, B)
            mask = mask.to(emissions.dtype)
            emitted = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)  # (T, B)
            moved = self.transitions[tags[:-1], tags[1:]]  # (T - 1, B)
            last = tags.gather(0, (mask.sum(0).long() - 1).unsqueeze(0)).squeeze(0)  # (B,)
            return (self.start_transitions[tags[0]] + (emitted * mask).sum(0) + (moved * mask[1:]).sum(0)
                    + self.end_transitions[last])

        def _compute_normalizer(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # emissions (T, B, C), mask (T, B), time first as in torchcrf
            score = self.start_transitions + emissions[0]  # (B, C)
            shift = self.transitions.max().detach()
            weights = torch.exp(self.transitions - shift)  # (C, C), entries in (0, 1]
            tiny = torch.finfo(emissions.dtype).tiny
            for i in range(1, emissions.size(0)):
                top = score.max(dim=1, keepdim=True).values.detach()  # (B, 1)
                total = (torch.exp(score - top) @ weights).clamp_min(tiny)  # (B, C): sum over the previous tag
                following = torch.log(total) + top + shift + emissions[i]
                score = torch.where(mask[i].unsqueeze(1), following, score)
            return torch.logsumexp(score + self.end_transitions, dim=1)

        def _viterbi_decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
            """torchcrf's Viterbi (the same fp32 sums, so the same paths), compiled (tasks_mtl.chain): one sentence
            of 45 characters in 0.044 ms against torchcrf's 0.85-0.99 ms for POS's 89 tags."""
            # emissions (T, B, C), mask (T, B) left-aligned, time first as in torchcrf
            return self.paths(emissions.transpose(0, 1), mask.sum(0))

        def paths(self, emissions: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
            """The best tag path of each row of batch-first (B, T, C) emissions over its first `lengths[b]`
            positions (none for 0): `decode` with a left-aligned mask, without its checks and transposes."""
            params = (emissions, self.start_transitions, self.end_transitions, self.transitions)
            return chain.viterbi(*(t.detach().float().cpu().numpy() for t in params), lengths.cpu().numpy())

    return MatmulCRF


class TokenHead(nn.Module):
    """Linear emissions per token, optionally decoded by a linear-chain CRF. With `window` (the width of the
    model's window features, tasks_mtl.ngrams.WindowFeatures) a second linear layer adds tag scores read
    straight from the token's character window, as a CRF's feature weights do; with `weights`, tag scores of
    the task's own per feature and tag (`WindowTagWeights`) are added too."""

    def __init__(self, hidden: int, num_tags: int, crf: bool, window: int = 0, dropout: float = 0.1,
                 weights: WindowTagWeights | None = None):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.emit = nn.Linear(hidden, num_tags)
        self.wide = nn.Linear(window, num_tags, bias=False) if window else None
        self.lexical = weights
        if crf:
            self.crf = _crf_class()(num_tags, batch_first=True)
        else:
            self.crf = None

    def forward(self, hidden_states: torch.Tensor, batch: dict) -> torch.Tensor:  # (B, T, H) -> (B, T, C)
        emissions = self.emit(self.dropout(hidden_states))
        if self.wide is not None:
            emissions = emissions + self.wide(batch["window_features"].to(emissions.dtype))
        if self.lexical is not None:
            emissions = emissions + self.lexical(batch["window_index"]).to(emissions.dtype)
        return emissions


class TokenClassificationTask:
    input_columns: tuple[str, ...] = ("tokens", "tags")

    def __init__(self, name: str, cfg: TaskConfig):
        self.name, self.cfg = name, cfg
        self.labels = cfg.tag_set()
        self.label2id = {tag: i for i, tag in enumerate(self.labels)}

    def encode(self, batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length,
                        return_overflowing_tokens=True)
        samples = enc.pop("overflow_to_sample_mapping")
        enc["labels"] = [first_piece_labels(enc.word_ids(i), batch["tags"][s], self.label2id)
                         for i, s in enumerate(samples)]
        return dict(enc)

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE, return_tensors="pt")

    def build_head(self, hidden: int, word_embeddings: nn.Embedding, ngrams=None, window: int = 0) -> nn.Module:
        weights = None
        if self.cfg.window_weights:
            weights = WindowTagWeights(ngrams, word_embeddings.num_embeddings, len(self.labels))
        return TokenHead(hidden, len(self.labels), self.cfg.crf, window if self.cfg.window_features else 0,
                         weights=weights)

    def logits(self, head: TokenHead, hidden_states: torch.Tensor, batch: dict) -> torch.Tensor:
        return head(hidden_states, batch)  # (B, T, C)

    def loss(self, head: TokenHead, hidden_states: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        emissions = head(hidden_states, batch).float()  # (B, T, C)
        labels = batch["labels"]  # (B, T)
        if not bool((labels != IGNORE).any()):  # no tagged token (e.g. a window of specials only)
            return emissions.sum() * 0.0, emissions
        if head.crf is None:  # per-token cross-entropy
            loss = nn.functional.cross_entropy(emissions.transpose(1, 2), labels, ignore_index=IGNORE)
            return loss, emissions
        packed, mask = pack_first_pieces(emissions, labels)  # (B, W, C), (B, W)
        tags, _ = pack_first_pieces(labels.unsqueeze(-1), labels)
        tags = tags.squeeze(-1).clamp(min=0)  # (B, W); padded slots are masked out
        rows = mask[:, 0]  # rows with a tagged token: a co-labelled batch may lack this task's labels on some
        # in fp32 even under bf16 autocast: the log-partition's matrix products in bf16 err by more than a fitted
        # CRF's loss (the joint stage logged ner losses of -0.012 after the L-BFGS fit)
        with torch.autocast(device_type=packed.device.type, enabled=False):
            loss = -head.crf(packed[rows], tags[rows], mask=mask[rows], reduction="token_mean")
        return loss, emissions
