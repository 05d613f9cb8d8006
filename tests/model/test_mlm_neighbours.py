"""MLM's neighbour n-gram scores (tasks_mtl.tasks.mlm.NeighbourScores): they read the tokens around a position and
never the position's own token, and they learn a local pattern the way an n-gram LM does."""

from __future__ import annotations

import torch

from tasks_mtl.ngrams import NgramTables
from tasks_mtl.tasks.mlm import NeighbourScores

VOCAB = 12


def _scores(seed: int = 0) -> NeighbourScores:
    torch.manual_seed(seed)
    sequences = torch.randint(1, VOCAB, (50, 20)).tolist()
    scores = NeighbourScores(NgramTables.build(sequences, VOCAB, min_count=1), VOCAB, dim=4)
    torch.nn.init.normal_(scores.out.weight)  # zero-initialised: give it weights to see what it reads
    return scores


def test_a_position_is_scored_from_its_neighbours_never_from_itself():
    scores = _scores()
    ids = torch.tensor([[3, 5, 7, 2, 9, 4, 6]])
    mask = torch.ones_like(ids)
    t = 3
    base = scores(scores.index(ids, mask))[0, t]
    centre = ids.clone()
    centre[0, t] = 11  # the token itself (masked, random or kept: the scores must not tell)
    assert torch.equal(scores(scores.index(centre, mask))[0, t], base)
    for offset in (-2, -1, 1, 2):
        moved = ids.clone()
        moved[0, t + offset] = 1 if int(ids[0, t + offset]) != 1 else 8
        assert not torch.allclose(scores(scores.index(moved, mask))[0, t], base), offset
    far = ids.clone()
    far[0, 0] = 10  # three positions away: outside the window
    assert torch.equal(scores(scores.index(far, mask))[0, t], base)


def test_the_scores_start_at_zero_so_the_head_starts_from_the_encoder():
    sequences = [[1, 2, 3, 4]] * 3
    scores = NeighbourScores(NgramTables.build(sequences, VOCAB, min_count=1), VOCAB, dim=4)
    ids = torch.tensor(sequences)
    assert torch.count_nonzero(scores(scores.index(ids, torch.ones_like(ids)))) == 0


def test_they_learn_a_token_its_left_neighbour_determines():
    """Token t is (token t-1 + 1) mod V: the left neighbour alone tells it, so a few Adam steps fit it."""
    torch.manual_seed(0)
    starts = torch.randint(0, VOCAB, (64, 1))
    ids = (starts + torch.arange(16)) % VOCAB  # (64, 16)
    mask = torch.ones_like(ids)
    scores = NeighbourScores(NgramTables.build(ids.tolist(), VOCAB, min_count=1), VOCAB, dim=8)
    dense = [p for n, p in scores.named_parameters() if n.startswith("out.")]
    sparse = [p for n, p in scores.named_parameters() if not n.startswith("out.")]
    optimizers = [torch.optim.Adam(dense, lr=0.05), torch.optim.SparseAdam(sparse, lr=0.05)]
    rows = scores.index(ids, mask)[:, 2:]  # positions with both left neighbours
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(scores(rows).flatten(0, 1), ids[:, 2:].flatten())
        for o in optimizers:
            o.zero_grad()
        loss.backward()
        for o in optimizers:
            o.step()
    accuracy = (scores(rows).argmax(-1) == ids[:, 2:]).float().mean()
    assert accuracy > 0.95
