"""Token emissions of texts longer than one window: each word's emissions come from the window where it sits
farthest from an edge (the most context on both sides), packed left-aligned per text for the CRF decode.

`place_words` picks that window and position for every word (word = a token of the caller's token list; the
tokenizer's `word_ids` map pieces to words), `pack` gathers each head's emissions into that layout with one
indexing operation, shared by the heads of one batch.
"""

from __future__ import annotations

import torch


def place_words(enc, owner: list[int], lengths: list[int], samples: int
                ) -> tuple[list[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """From a tokenizer's batch `enc` of windows (`owner[f]`: the sample of window f, `lengths[f]`: its tokens):
    per sample, its words that have a position, in order; and the layout `pack` reads: the (N, W) mask of those
    words (left-aligned), and the window (feature) and position of each of them, in that order."""
    best: list[dict[int, tuple[int, int, int]]] = [{} for _ in range(samples)]  # word -> (margin, window, position)
    for f, sample in enumerate(owner):
        previous = None
        for pos, word in enumerate(enc.word_ids(f)):
            if word is not None and word != previous:  # a word's first piece
                margin = min(pos, lengths[f] - 1 - pos)
                if word not in best[sample] or margin > best[sample][word][0]:
                    best[sample][word] = (margin, f, pos)
            previous = word
    present = [sorted(b) for b in best]
    width = max([len(p) for p in present] + [1])
    mask = torch.arange(width)[None, :] < torch.tensor([len(p) for p in present])[:, None]
    index = torch.tensor([b[w][1:] for b, words in zip(best, present) for w in words], dtype=torch.long)
    return present, (mask, *index.view(-1, 2).unbind(1))


def pack(emissions: torch.Tensor, mask: torch.Tensor, windows: torch.Tensor, positions: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, T, C) emissions of the windows -> (N, W, C) emissions of each sample's words in order (zero past its
    words), and the (N, W) mask: the layout of `place_words`."""
    packed = emissions.new_zeros(*mask.shape, emissions.shape[-1])
    packed[mask] = emissions[windows, positions]
    return packed, mask
