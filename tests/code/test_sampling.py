"""Task samplers: the exact draws, step counting and schedules that mutation testing found untested."""

from __future__ import annotations

import numpy as np
import pytest

from tasks_mtl.sampling import build_sampler

SIZES = {"a": 900, "b": 100, "c": 25}


def test_round_robin_visits_each_task_in_turn() -> None:
    sampler = build_sampler("round_robin", list(SIZES), SIZES, total_steps=9, seed=0)
    assert [sampler.next()[0] for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


@pytest.mark.parametrize("name", ["round_robin", "all", "proportional", "annealed"])
def test_every_draw_counts_one_step_of_progress(name: str) -> None:
    sampler = build_sampler(name, list(SIZES), SIZES, total_steps=8, seed=0)
    assert sampler.state_dict()["step"] == 0
    for _ in range(6):
        sampler.next()
    state = sampler.state_dict()
    assert state["step"] == 6 and state["progress"] == pytest.approx(0.75)


def test_all_tasks_returns_every_task_each_step() -> None:
    sampler = build_sampler("all", list(SIZES), SIZES, total_steps=3, seed=0)
    assert [sampler.next() for _ in range(3)] == [list(SIZES)] * 3


def test_annealed_exponent_moves_linearly_and_stops_at_the_end() -> None:
    sampler = build_sampler("annealed", list(SIZES), SIZES, total_steps=10, seed=0, start=1.0, end=0.2)
    sizes = np.array(list(SIZES.values()), dtype=np.float64)

    def expected(alpha: float) -> np.ndarray:
        return sizes**alpha / (sizes**alpha).sum()

    np.testing.assert_allclose(sampler.probabilities(), expected(1.0))
    for _ in range(5):
        sampler.next()
    np.testing.assert_allclose(sampler.probabilities(), expected(0.6))  # half-way: (1.0 + 0.2) / 2
    for _ in range(15):  # past the stage's end the exponent stays at `end`
        sampler.next()
    np.testing.assert_allclose(sampler.probabilities(), expected(0.2))


def test_temperature_probabilities_are_sizes_to_the_inverse_temperature() -> None:
    sampler = build_sampler("temperature", list(SIZES), SIZES, total_steps=10, seed=0, temperature=2.0)
    root = np.sqrt(np.array(list(SIZES.values()), dtype=np.float64))
    np.testing.assert_allclose(sampler.probabilities(), root / root.sum())


def test_fixed_shares_accept_a_zero_share_and_reject_negative_or_empty_ones() -> None:
    sampler = build_sampler("fixed", ["a", "b"], {"a": 1, "b": 1}, 10, seed=0, weights={"a": 1.0, "b": 0.0})
    np.testing.assert_allclose(sampler.probabilities(), [1.0, 0.0])
    assert {sampler.next()[0] for _ in range(50)} == {"a"}
    with pytest.raises(ValueError, match="shares must be >= 0"):  # a negative share, even with a positive sum
        build_sampler("fixed", ["a", "b"], {"a": 1, "b": 1}, 10, seed=0, weights={"a": 2.0, "b": -1.0})
    with pytest.raises(ValueError, match="positive sum"):
        build_sampler("fixed", ["a", "b"], {"a": 1, "b": 1}, 10, seed=0, weights={"a": 0.0, "b": 0.0})
