"""GRPO-lambda: the top-lambda switch, the sigmoid length reward by hand, reward routing, and
the limits lambda = 0 (GRPO) and lambda = 1 (GRPO + length penalty on every group)."""
import pytest
import torch

from rlx.algorithms._rl import group_advantages
from rlx.algorithms._sampling import Scored
from rlx.algorithms.grpo import GRPO
from rlx.algorithms.grpo_lambda import GRPOLambda, efficiency_groups, kimi_length_reward, sigmoid_length_reward
from rlx.errors import RlxError
from rlx.rewards import WeightedSum
from rlx.rollout import Rollout
from rlx.tasks import run_training
from tests.support import Alternating, loss_of, small_config

RHO = torch.tensor([0.25, 1.0, 0.5, 0.75])


@pytest.mark.parametrize("fraction,expected", [(0.5, [1, 3]), (0.25, [1]), (0.0, []), (1.0, [0, 1, 2, 3])])
def test_top_lambda_selects_the_most_solved_groups(fraction, expected):
    assert efficiency_groups(RHO, fraction).nonzero().flatten().tolist() == expected


def test_ties_break_by_batch_order_and_threshold_mode_is_absolute():
    assert efficiency_groups(torch.full((4,), 0.5), 0.5).nonzero().flatten().tolist() == [0, 1]
    assert efficiency_groups(RHO, 0.0, mode="threshold", threshold=0.75).nonzero().flatten().tolist() == [1, 3]


def test_sigmoid_length_reward_by_hand():
    r = sigmoid_length_reward(torch.tensor([100, 200, 300]), torch.ones(3), alpha=0.5)
    torch.testing.assert_close(r, torch.tensor([0.886449, 0.75, 0.613551]), atol=1e-6, rtol=0)
    # rlx's GRPO divides by the (n-1) std: the population-std advantage times sqrt((n-1)/n)
    torch.testing.assert_close(group_advantages(r, 3, "group", eps=0), torch.tensor([1.2247, 0.0, -1.2247]) * (2 / 3) ** 0.5,
                               atol=1e-4, rtol=0)


def test_a_wrong_answers_length_is_ignored():
    r = sigmoid_length_reward(torch.tensor([100, 200, 300, 50]), torch.tensor([1.0, 1, 1, 0]), alpha=0.5)
    torch.testing.assert_close(r, torch.tensor([0.886449, 0.75, 0.613551, 0.0]), atol=1e-6, rtol=0)
    population = torch.tensor([0.956197, 0.553442, 0.150688, -1.660326])
    torch.testing.assert_close(group_advantages(r, 4, "group", eps=0), population * (3 / 4) ** 0.5, atol=1e-5, rtol=0)


def test_kimi_reward_keeps_wrong_answers_at_or_below_zero():
    r = kimi_length_reward(torch.tensor([10, 20, 30, 40]), torch.tensor([1.0, 1, 0, 0]))
    assert r.tolist() == pytest.approx([1.5, 1 + 1 / 6, -1 / 6, -0.5])


def scored(correct, lengths, rewards=None):
    """A Scored with responses of the given lengths (no model needed)."""
    lengths = torch.tensor(lengths)
    B, R = len(lengths), int(lengths.max())
    mask = (torch.arange(R) < lengths[:, None]).long()
    rollout = Rollout(torch.ones(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long), mask, mask,
                      torch.zeros(B, R), torch.ones(B, dtype=torch.bool))
    correct = torch.tensor(correct, dtype=torch.float32)
    return Scored([{}] * B, rollout, correct.clone() if rewards is None else rewards, correct, {})


def algo(**kwargs):
    return GRPOLambda(WeightedSum({}, {}), group_size=4, **kwargs)


def test_routing_all_wrong_groups_get_nothing_and_all_correct_ones_only_inside_s():
    # group 0: all correct, lengths differ; group 1: all wrong
    s = scored([1, 1, 1, 1, 0, 0, 0, 0], [10, 20, 30, 40, 10, 20, 30, 40])
    inside = algo(fraction=1.0).advantages(s)
    assert inside[:4].abs().min() > 0 and inside[:4][0] > inside[:4][3]  # shorter correct answers preferred
    assert inside[4:].abs().max() == 0
    outside = algo(fraction=0.0).advantages(scored([1, 1, 1, 1, 0, 0, 0, 0], [10, 20, 30, 40, 10, 20, 30, 40]))
    assert outside.abs().max() == 0


def test_only_the_selected_groups_are_length_penalised():
    # group 0 (rho 0.75) is selected at fraction 0.5, group 1 (rho 0.5) is not
    s = scored([1, 1, 1, 0, 1, 1, 0, 0], [10, 30, 50, 5, 10, 30, 5, 5])
    a = algo(fraction=0.5)
    rewards, chosen = a.shaped_rewards(s.rewards, s.correct, s.rollout.lengths.float())
    assert chosen.tolist() == [True, False]
    assert rewards[4:].tolist() == [1.0, 1.0, 0.0, 0.0]  # plain correctness outside S
    assert rewards[0] > rewards[1] > rewards[2] > rewards[3] == 0.0
    a.advantages(s)
    assert s.metrics["grpo_lambda/selected"] == 0.5 and s.metrics["grpo_lambda/rho_selected"] == 0.75


def test_fraction_one_is_grpo_with_the_length_reward_on_every_group():
    s = scored([1, 1, 0, 1, 1, 0, 0, 1], [12, 30, 7, 18, 25, 9, 40, 33])
    expected = torch.cat([sigmoid_length_reward(s.rollout.lengths[g:g + 4], s.correct[g:g + 4], 0.6) for g in (0, 4)])
    torch.testing.assert_close(algo(fraction=1.0).advantages(s), group_advantages(expected, 4, "group"))


def test_fraction_zero_is_grpo_bit_for_bit_on_a_real_rollout():
    ours, batch = loss_of(GRPOLambda, Alternating(), fraction=0.0)
    grpo, _ = loss_of(GRPO, Alternating())
    assert batch["advantages"].abs().sum() > 0 and torch.equal(ours, grpo)


def test_bad_mode_is_one_clear_error():
    with pytest.raises(RlxError, match="algo.mode"):
        algo(mode="bottom")


def test_grpo_lambda_runs_in_the_loop(tmp_path):
    run_training(small_config("algo=grpo_lambda", "algo.group_size=2", "algo.max_new_tokens=8", "algo.fraction=0.5",
                              "trainer.micro_batch_size=2"), tmp_path)
    assert "grpo_lambda/selected" in (tmp_path / "metrics.jsonl").read_text()
