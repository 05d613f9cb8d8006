"""Character n-gram signal over token ids: the features the classical peers (CRF windows, TF-IDF
char n-grams) live on, given to the neural model.

An n-gram is keyed by the token ids it spans (`key = ((a * V) + b) * V + c`), so it needs no text at
run time and works with any vocabulary, the corpus one or a pretrained BERT's. The tables hold the
sorted keys of the n-grams seen at least `min_count` times in the training text; a lookup is a
`searchsorted`, on the model's device, and an unseen n-gram gets index 0.

- `BigramEmbedding`: each position gets the embeddings of its left and right bigram, concatenated
  and projected to the hidden size, added to the token embedding (zero-initialised projection on
  a pretrained BERT, so training starts from the checkpoint's function).
- `NgramBag`: the mean (or root-normalised sum) of a text's char 1..3-gram embeddings (a fastText-style
  bag), for sentence heads.
- `WindowFeatures`: per position, the features a character CRF reads (the tokens at offsets -2..+2, the
  four bigrams of that window and the centred trigram), each embedded; token heads read them through a
  linear layer straight to their tag scores (a factorised log-linear tagger beside the encoder's path).
- `pair_overlap`: the n-gram overlap of the two texts of a pair (the signal of consecutive sentences).
- `WindowTagWeights`: the same window with a weight per feature and tag, per task (a CRF's emission
  weights, unfactorised), for tasks with few tags.

The tables are large (10^5 rows) and a batch touches a few thousand rows, so their embeddings are
sparse: `sparse_parameters()` lists them for a sparse optimizer; a dense AdamW step over them would
cost more than the encoder's forward pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

ORDERS = (2, 3)
FILE = "ngrams.safetensors"


def ngram_keys(ids: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) keys of the n-gram that *ends* at each position (-1 where it would
    start before the sequence): ids[t - n + 1] * vocab^(n-1) + ... + ids[t]."""
    ids = ids.long()
    if n == 1:
        return ids
    if ids.shape[1] < n:
        return torch.full_like(ids, -1)
    powers = vocab ** torch.arange(n - 1, -1, -1, device=ids.device)
    grams = (ids.unfold(1, n, 1) * powers).sum(-1)  # (B, T - n + 1): the n-gram ending at t = its start + n - 1
    return torch.nn.functional.pad(grams, (n - 1, 0), value=-1)


class NgramTables(nn.Module):
    """Sorted keys of the known n-grams of each order (buffers, not trained)."""

    def __init__(self, vocab: int, keys: dict[int, torch.Tensor]):
        super().__init__()
        self.vocab = vocab
        self.orders = sorted(keys)
        for n, k in keys.items():
            self.register_buffer(f"keys{n}", k.long(), persistent=False)

    def size(self, n: int) -> int:
        """Rows an embedding over this order needs (index 0 = unknown)."""
        return int(getattr(self, f"keys{n}").numel()) + 1

    def lookup(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T) ids -> (B, T) index of the n-gram ending at each position, 0 when unknown."""
        table = getattr(self, f"keys{n}")
        keys = ngram_keys(ids, n, self.vocab)
        if table.numel() == 0:
            return torch.zeros_like(keys)
        pos = torch.searchsorted(table, keys).clamp(max=table.numel() - 1)
        return torch.where(table[pos] == keys, pos + 1, torch.zeros_like(pos))

    @classmethod
    def build(cls, sequences: list[list[int]], vocab: int, min_count: int,
              orders: tuple[int, ...] = ORDERS) -> NgramTables:
        """Tables of the n-grams seen at least `min_count` times in `sequences` (other orders: empty)."""
        keys = {n: torch.zeros(0, dtype=torch.long) for n in ORDERS}
        for n in orders:
            parts = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) >= n]
            if not parts:
                continue
            grams = []
            for s in parts:  # vectorised per sequence: windows of n ids -> one key
                key = s[: len(s) - n + 1].copy()
                for shift in range(1, n):
                    key = key * vocab + s[shift: len(s) - n + 1 + shift]
                grams.append(key)
            unique, counts = np.unique(np.concatenate(grams), return_counts=True)
            keys[n] = torch.from_numpy(unique[counts >= min_count])
        return cls(vocab, keys)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"keys{n}": getattr(self, f"keys{n}").cpu().contiguous() for n in self.orders}
        save_file(tensors, str(Path(directory) / FILE), metadata={"vocab": str(self.vocab)})

    @classmethod
    def load(cls, directory: Path) -> NgramTables | None:
        from safetensors import safe_open

        path = Path(directory) / FILE
        if not path.exists():
            return None
        with safe_open(str(path), "pt") as fh:
            vocab = int(fh.metadata()["vocab"])
            keys = {int(name[4:]): fh.get_tensor(name) for name in fh.keys()}
        return cls(vocab, keys)


class BigramEmbedding(nn.Module):
    """Left and right bigram embeddings of each position -> (B, T, H), added to the token embedding."""

    def __init__(self, tables: NgramTables, dim: int, hidden: int, zero_init: bool):
        super().__init__()
        self.tables = [tables]  # a list: the tables belong to the model, not to this module
        self.embed = nn.Embedding(tables.size(2), dim, padding_idx=0, sparse=True)  # rows touched per step only
        self.project = nn.Linear(2 * dim, hidden)
        if zero_init:
            nn.init.zeros_(self.project.weight)
            nn.init.zeros_(self.project.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        left = self.tables[0].lookup(ids, 2)  # bigram (t-1, t)
        right = torch.nn.functional.pad(left[:, 1:], (0, 1))  # bigram (t, t+1) ends at t+1
        return self.project(torch.cat([self.embed(left), self.embed(right)], dim=-1))


class NgramBag(nn.Module):
    """The char 1-, 2- and 3-gram embeddings of each text, summed and divided by their count (`norm="mean"`)
    or by its square root (`"sqrt"`: the scale of an L2-normalised term-frequency vector, where each n-gram of
    a long text keeps its weight): (B, T) ids -> (B, dim)."""

    def __init__(self, tables: NgramTables, vocab: int, dim: int, dropout: float = 0.3, norm: str = "mean"):
        super().__init__()
        self.tables = [tables]
        self.norm = norm
        self.unigrams = nn.Embedding(vocab, dim, sparse=True)
        self.grams = nn.ModuleDict({str(n): nn.Embedding(tables.size(n), dim, padding_idx=0, sparse=True)
                                    for n in ORDERS})
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            for emb in [self.unigrams, *self.grams.values()]:
                nn.init.normal_(emb.weight, std=0.02)
            for emb in self.grams.values():
                emb.weight[0].zero_()  # the "unknown" row adds nothing (and padding_idx keeps it at zero)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()  # (B, T): real tokens, specials included (their n-grams mark the text's edges)
        total = self.unigrams(ids) * mask[..., None]  # (B, T, D)
        count = mask.sum(1, keepdim=True).float()  # (B, 1)
        for n, emb in self.grams.items():
            index = self.tables[0].lookup(ids, int(n)) * mask  # 0 (unknown, padded) contributes nothing
            total = total + emb(index)
            count = count + (index > 0).sum(1, keepdim=True)
        count = count.clamp(min=1)
        return self.dropout(total.sum(1) / (count if self.norm == "mean" else count.sqrt()))  # (B, D)


OVERLAP_SCALE = 20.0  # overlaps are ~0.01-0.2: scaled so a classifier's weights on them sit where Adam moves them


def pair_overlap(ids: torch.Tensor, first: torch.Tensor, second: torch.Tensor, vocab: int) -> torch.Tensor:
    """How much two texts share: for n = 1, 2, 3, the positions of the first text whose char n-gram occurs
    in the second, over sqrt(n-grams of the first x n-grams of the second) (a cosine of the two n-gram
    multisets seen from the first text), times OVERLAP_SCALE. (B, T) ids and the two texts' (B, T) masks ->
    (B, 3). Consecutive sentences of one paragraph share names and topic words; a sentence from elsewhere
    rarely does (the bundled nsp: these three features alone give logistic regression 0.79 accuracy)."""
    out = []
    for n in (1, 2, 3):
        keys = ngram_keys(ids, n, vocab)  # (B, T): the n-gram ending at each position
        start_a = torch.nn.functional.pad(first, (n - 1, 0), value=False)[:, : ids.shape[1]]  # first[t - n + 1]
        start_b = torch.nn.functional.pad(second, (n - 1, 0), value=False)[:, : ids.shape[1]]
        in_a, in_b = first & start_a & (keys >= 0), second & start_b & (keys >= 0)  # n-gram inside one text
        same = keys[:, :, None] == keys[:, None, :]  # (B, T, T)
        found = (same & in_b[:, None, :]).any(2) & in_a  # (B, T): a's n-grams that occur in b
        size = (in_a.sum(1) * in_b.sum(1)).clamp(min=1).float().sqrt()
        out.append(found.sum(1) / size)
    return torch.stack(out, dim=1) * OVERLAP_SCALE


def at_offsets(values: torch.Tensor, offsets: tuple[int, ...]) -> list[torch.Tensor]:
    """(B, T, ...) -> one (B, T, ...) tensor per offset k, with out[:, t] = values[:, t + k], zero where t + k
    falls outside (slices of one zero-padded copy)."""
    before, after = max(0, -min(offsets)), max(0, max(offsets))
    length = values.shape[1]
    padded = torch.nn.functional.pad(values, (0, 0) * (values.dim() - 2) + (before, after))
    return [padded[:, before + k: before + k + length] for k in offsets]


class WindowFeatures(nn.Module):
    """The CRF window of each position, embedded: (B, T) ids -> (B, T, 10 * dim).

    Slots, in order: tokens at t-2..t+2, bigrams (t-2,t-1), (t-1,t), (t,t+1), (t+1,t+2), trigram
    (t-1,t,t+1). Each slot is an embedding of its feature; padding contributes zeros, so a row's features
    do not depend on how its batch was padded. Shared by the token heads, each of which maps the slots
    to its tags with one linear layer."""

    UNIGRAMS = (-2, -1, 0, 1, 2)
    BIGRAM_ENDS = (-1, 0, 1, 2)  # the bigram that ends at t+k
    SLOTS = len(UNIGRAMS) + len(BIGRAM_ENDS) + 1

    def __init__(self, tables: NgramTables, vocab: int, dim: int):
        super().__init__()
        self.tables = [tables]
        self.dim = dim
        self.unigrams = nn.Embedding(vocab, dim, sparse=True)
        self.bigrams = nn.Embedding(tables.size(2), dim, padding_idx=0, sparse=True)
        self.trigrams = nn.Embedding(tables.size(3), dim, padding_idx=0, sparse=True)
        with torch.no_grad():
            for emb in (self.unigrams, self.bigrams, self.trigrams):
                nn.init.normal_(emb.weight, std=0.1)
            self.bigrams.weight[0].zero_()
            self.trigrams.weight[0].zero_()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.embed(window_index(self.tables[0], ids, mask))

    def embed(self, index: torch.Tensor) -> torch.Tensor:
        """(B, T, 10) slot indices (`window_index`) -> (B, T, 10 D): one lookup per kind of feature."""
        tokens = index[..., : len(self.UNIGRAMS)]  # id + 1, 0 = none
        unigrams = self.unigrams((tokens - 1).clamp(min=0)) * (tokens > 0)[..., None]  # (B, T, 5, D)
        bigrams = self.bigrams(index[..., len(self.UNIGRAMS): self.SLOTS - 1])  # (B, T, 4, D); row 0 is zero
        trigrams = self.trigrams(index[..., self.SLOTS - 1])  # (B, T, D)
        return torch.cat([unigrams.flatten(-2), bigrams.flatten(-2), trigrams], dim=-1)


def window_index(tables: NgramTables, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The CRF window of each position as row indices: (B, T) ids -> (B, T, 10), one column per slot of
    `WindowFeatures.SLOTS` order; 0 where the slot falls outside the text, on padding or on an unknown
    n-gram (token slots hold id + 1)."""
    real = mask.bool()
    tokens = (ids.long() + 1) * real
    bigrams = tables.lookup(ids, 2) * real
    trigrams = tables.lookup(ids, 3) * real
    slots = at_offsets(tokens, WindowFeatures.UNIGRAMS) + at_offsets(bigrams, WindowFeatures.BIGRAM_ENDS)
    return torch.stack(slots + at_offsets(trigrams, (1,)), dim=-1)


class WindowTagWeights(nn.Module):
    """One weight per (window feature, tag) for one task: each slot of the CRF window (a token at an
    offset, a bigram, the trigram) has its own table of tag scores, summed per position: (B, T, 10) indices
    -> (B, T, C). These are exactly a linear-chain CRF's emission weights, where `WindowFeatures` shares
    32-wide slot embeddings across the token tasks; rare features (person names) keep their own weights
    per tag. Zero-initialised: the head starts from its other scores."""

    def __init__(self, tables: NgramTables, vocab: int, num_tags: int):
        super().__init__()
        sizes = [vocab + 1] * len(WindowFeatures.UNIGRAMS) + [tables.size(2)] * len(WindowFeatures.BIGRAM_ENDS)
        sizes.append(tables.size(3))
        self.slots = nn.ModuleList(nn.Embedding(n, num_tags, padding_idx=0, sparse=True) for n in sizes)
        with torch.no_grad():
            for emb in self.slots:
                emb.weight.zero_()

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        scores = self.slots[0](index[..., 0])
        for i, emb in enumerate(self.slots[1:], start=1):
            scores = scores + emb(index[..., i])
        return scores


def padded_ids(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenized rows -> (B, T) input ids and attention mask, right-padded with zeros (the solvers' fits read
    the rows' n-gram features in chunks this way)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return ids, mask


def sparse_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Weights of the sparse embeddings inside `module` (they need a sparse optimizer, no clipping)."""
    return [m.weight for m in module.modules() if isinstance(m, nn.Embedding) and m.sparse]
