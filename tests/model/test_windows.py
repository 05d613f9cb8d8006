"""Texts longer than a window: each word's emissions come from the window where it sits farthest from an edge
(tasks_mtl.windows), packed left-aligned per text."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tasks_mtl import windows


def _enc(word_ids: list[list[int | None]]):
    return SimpleNamespace(word_ids=lambda f: word_ids[f])


def test_each_word_takes_the_window_where_it_sits_farthest_from_an_edge():
    word_ids = [[None, 0, 1, 2, 3, 4, None],  # sample 0, first window
                [None, 2, 3, 4, 5, 6, None],  # sample 0, second window (overlap: words 2-4)
                [None, 0, 0, 1, None, None, None]]  # sample 1: word 0 in two pieces, word 2 dropped (whitespace)
    owner, lengths = [0, 0, 1], [7, 7, 5]
    present, (mask, where, positions) = windows.place_words(_enc(word_ids), owner, lengths, samples=2)
    assert present == [[0, 1, 2, 3, 4, 5, 6], [0, 1]]
    assert mask.tolist() == [[True] * 7, [True, True] + [False] * 5]
    chosen = list(zip(where.tolist(), positions.tolist()))
    # word 2: margin 3 in the first window, 1 in the second; word 4: 1 and 3; word 3: 2 and 2 (a tie keeps the first)
    assert chosen[:7] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 3), (1, 4), (1, 5)]
    assert chosen[7:] == [(2, 1), (2, 3)]  # a word's first piece

    emissions = torch.arange(3 * 7).float().view(3, 7, 1) * torch.tensor([1.0, -1.0])  # (window, position) -> value
    packed, packed_mask = windows.pack(emissions, mask, where, positions)
    assert torch.equal(packed_mask, mask)
    assert packed[0, :, 0].tolist() == [1, 2, 3, 4, 10, 11, 12]  # 7 * window + position
    assert packed[1, :, 0].tolist() == [15, 17, 0, 0, 0, 0, 0] and packed[1, :, 1].tolist()[:2] == [-15, -17]


def test_a_batch_without_words_packs_to_an_empty_mask():
    present, (mask, where, positions) = windows.place_words(_enc([[None, None]]), [0], [2], samples=1)
    assert present == [[]] and mask.tolist() == [[False]]
    packed, _ = windows.pack(torch.ones(1, 2, 3), mask, where, positions)
    assert packed.shape == (1, 1, 3) and not packed.any()
