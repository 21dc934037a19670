"""DLER: batch normalisation and the truncation penalty by hand, DA-DLER's per-prompt budget,
clip-higher, the limit that is GRPO, update-selective merging, and a run in the loop."""
import pytest
import torch
from typer.testing import CliRunner

from rlx.algorithms._rl import clipped_policy_loss, group_advantages, whiten
from rlx.algorithms.dler import DLER, truncation_rewards
from rlx.algorithms.grpo import GRPO
from rlx.cli import app
from rlx.errors import RlxError
from rlx.merge import merge_updates
from rlx.models import tiny
from rlx.rewards import WeightedSum
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import TASK, TINY, Alternating, Constant, eos_policy, loss_of, small_config

REWARDS = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])


def test_batch_token_normalisation_by_hand():
    ones = torch.ones(8)
    # group-centred [.75, -.25 x3, .5, .5, -.5, -.5]; token-weighted Bessel std over 8 tokens = 0.5
    torch.testing.assert_close(group_advantages(REWARDS, 4, "batch_tokens", lengths=ones),
                               torch.tensor([1.5, -0.5, -0.5, -0.5, 1.0, 1.0, -1.0, -1.0]), atol=1e-4, rtol=0)
    # GRPO's per-group (n-1) std gives the second group 0.5 / 0.5774 instead
    torch.testing.assert_close(group_advantages(REWARDS, 4, "group"),
                               torch.tensor([1.5, -0.5, -0.5, -0.5, 0.866, 0.866, -0.866, -0.866]), atol=1e-3, rtol=0)


def test_batch_statistics_are_token_weighted():
    lengths = torch.tensor([10, 10, 10, 10, 1, 1, 1, 1])
    adv = group_advantages(REWARDS, 4, "batch_tokens", lengths=lengths)
    # the same as whitening the advantages broadcast over each response's tokens (verl masked_whiten)
    mask = (torch.arange(10) < lengths[:, None]).float()
    centred = group_advantages(REWARDS, 4, "none")
    broadcast = whiten(centred[:, None] * mask, mask)
    torch.testing.assert_close(adv, broadcast[:, 0], atol=1e-5, rtol=0)
    # var = (10 * 0.75 + 1 * 1) / 43: the long first group dominates the std
    assert adv[0].item() == pytest.approx(0.75 / (8.5 / 43) ** 0.5, abs=1e-4)
    assert adv[0] != group_advantages(REWARDS, 4, "batch_tokens", lengths=torch.ones(8))[0]


def test_truncation_penalty_zeroes_responses_that_hit_the_budget():
    rewards = correct = torch.ones(4)
    lengths = torch.tensor([48, 48, 30, 10])
    finished = torch.tensor([False, True, True, True])  # the first was cut at L_T = 48, the second ended there
    assert truncation_rewards(rewards, correct, lengths, finished, 2).tolist() == [0.0, 1.0, 1.0, 1.0]


def test_difficulty_aware_budget_applies_to_easy_groups_only():
    correct = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0])  # c_q = 0.75 (easy) and 0.25 (hard)
    lengths = torch.tensor([40, 20, 40, 40, 40, 20, 40, 40])
    finished = torch.ones(8, dtype=torch.bool)
    out = truncation_rewards(correct, correct, lengths, finished, 4, easy_budget=32, easy_threshold=0.5)
    assert out.tolist() == [0.0, 1, 0, 0, 1, 0, 0, 0]  # the hard group keeps its long correct answer
    assert truncation_rewards(correct, correct, lengths, finished, 4).tolist() == correct.tolist()


def test_clip_higher_lets_a_positive_advantage_token_keep_its_gradient():
    def grad_at_ratio(eps_high):
        logp = torch.log(torch.tensor([[1.25]])).requires_grad_()
        loss, clipped = clipped_policy_loss(logp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), 0.2, eps_high)
        loss.sum().backward()
        return logp.grad.item(), clipped.item()

    assert grad_at_ratio(0.2) == (0.0, True)
    grad, clipped = grad_at_ratio(0.28)
    assert grad == pytest.approx(-1.25) and not clipped






def test_with_group_normalisation_and_symmetric_clipping_dler_is_grpo():
    dler, batch = loss_of(DLER, Alternating(), scale="group", eps_high=0.2, dynamic_sampling=False)
    grpo, _ = loss_of(GRPO, Alternating(), scale="group", eps_high=0.2)
    assert batch["advantages"].abs().sum() > 0  # every response finished: the gate kept the rewards
    assert torch.equal(dler, grpo)


def test_with_nothing_truncated_and_symmetric_clipping_dler_is_grpo_with_batch_normalisation():
    dler, batch = loss_of(DLER, Alternating(), eps_high=0.2, dynamic_sampling=False)
    grpo, _ = loss_of(GRPO, Alternating(), scale="batch_tokens")
    assert batch["advantages"].abs().sum() > 0 and torch.equal(dler, grpo)


def test_truncated_responses_lose_their_reward_in_a_real_rollout():
    policy = tiny(**TINY, device="cpu")  # untrained: it rarely emits EOS within 8 tokens
    state = TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.1), None, TASK)
    algo = DLER(WeightedSum({"r": Constant()}, {"r": 1.0}), group_size=4, max_new_tokens=8, dynamic_sampling=False)
    torch.manual_seed(0)
    scored = algo._sample(TASK.split("train")[:2], state)
    assert (~scored.rollout.finished).any()
    assert scored.rewards.tolist() == scored.rollout.finished.float().tolist()
    assert scored.metrics["reward/mean"] == 1.0 and scored.metrics["dler/reward"] < 1.0


def test_all_constant_groups_end_after_max_draws_not_forever():
    from rlx.data.stream import ExampleStream, NextBatch

    policy = eos_policy()
    state = TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.1), None, TASK)
    stream = ExampleStream(TASK.split("train"), 2, seed=0)
    algo = DLER(WeightedSum({"r": Constant()}, {"r": 1.0}), group_size=4, max_new_tokens=8, max_draws=3)
    batch = algo.make_batch(NextBatch(stream), state)
    assert batch["metrics"]["rl/draws"] == 4 and batch["metrics"]["rl/groups_with_signal"] == 0.0
    assert batch["advantages"].abs().max() == 0  # nothing to learn from, and no NaN from a zero std


def test_merge_keeps_the_largest_updates_of_each_tensor():
    base = {"w": torch.zeros(4, 5), "b": torch.zeros(8), "step": torch.tensor(3)}
    tuned = {"w": torch.arange(20.0).view(4, 5) - 10, "b": torch.arange(8.0), "step": torch.tensor(7)}
    assert all(torch.equal(merge_updates(base, tuned, 1.0, 1.0)[k], tuned[k]) for k in base)
    assert all(torch.equal(merge_updates(base, tuned, 0.0, 0.7)[k], base[k]) for k in ("w", "b"))
    merged = merge_updates(base, tuned, 0.25, 0.7)
    assert (merged["w"] != 0).float().mean() == 0.25 and (merged["b"] != 0).float().mean() == 0.25
    # w's largest |delta|: -10, 9, -9, 8, -8 ... keep 5 of 20; ties at |8| are both kept
    assert sorted(merged["w"].flatten()[merged["w"].flatten() != 0].tolist()) == pytest.approx(
        [-7.0, -6.3, -5.6, 5.6, 6.3])
    assert merged["b"].tolist() == pytest.approx([0, 0, 0, 0, 0, 0, 4.2, 4.9])


def test_merge_rejects_mismatched_models():
    with pytest.raises(RlxError, match="different parameters"):
        merge_updates({"a": torch.zeros(2)}, {"b": torch.zeros(2)})


def test_dler_runs_in_the_loop_and_rlx_merge_writes_a_loadable_checkpoint(tmp_path):
    overrides = ["algo=dler", "algo.group_size=2", "algo.max_new_tokens=8", "algo.easy_budget=4",
                 "algo.difficulty_aware=true", "algo.minibatches=2", "trainer.micro_batch_size=2"]
    run_training(small_config(*overrides), tmp_path / "run")
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "dler/all_zero_groups" in rows and "rl/kl" in rows
    from rlx.models import hf
    from rlx.state import find_checkpoint, load_model_weights

    policy = tiny(**TINY, device="cpu")  # the base: fresh weights of the same architecture
    policy.model.save_pretrained(tmp_path / "base")
    policy.tokenizer.save_pretrained(tmp_path / "base")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "run"), str(tmp_path / "out"),
                                      "--keep", "1", "--scale", "1"])
    assert result.exit_code == 0, result.output
    merged = hf(str(tmp_path / "out"), device="cpu", dtype="float32").model
    tuned = tiny(**TINY, device="cpu").model
    load_model_weights(tuned, find_checkpoint(tmp_path / "run"))
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), tuned.state_dict().values()))
    bad = CliRunner().invoke(app, ["merge", str(tmp_path / "nope"), str(tmp_path / "run"), str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "does not exist" in bad.output
