"""DRPO: the hand-computed objective and its gradients, the sign property GRPO with a length penalty
lacks, the lambda and degenerate-group limits, the trust region, the 1/N normaliser, one real step on
the tiny model and a run in the loop."""
import copy
import json
import math

import pytest
import torch

from rlx.algorithms._rl import group_advantages
from rlx.algorithms.drpo import DRPO, drpo_loss, drpo_objective, positive_weights, trust_region_penalty
from rlx.data.reasoning import ReasoningTask
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import Correctness, WeightedSum
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


class AlternatingTask(ReasoningTask):
    """The reasoning task with a checker that accepts every other response it sees, so each group
    (an even number of consecutive rows) holds both correct and incorrect responses."""

    calls = 0

    def score(self, response, example):
        self.calls += 1
        return float(self.calls % 2)


def objective(scores, correct, lengths, max_len, lam=0.1, tau=10.0, group_size=4):
    weights = positive_weights(torch.tensor(lengths), torch.tensor(correct), max_len, lam, group_size)
    return drpo_objective(scores, torch.tensor(correct), weights, tau, group_size)


# ---------------------------------------------------------------------------- 1. hand-computed


def test_hand_computed_objective_and_gradients():
    # correct: r_l = 1 - |o|/10 = [0.9, 0.5] (lengths 1, 5), s = [-0.2, -0.4]; incorrect: s = [-0.3, -1.0]
    # w = softmax([9, 5]) = [1, e^-4] / (1 + e^-4) = [0.982014, 0.017986]
    # positive term 0.982014 * -0.2 + 0.017986 * -0.4 = -0.203597
    # tau logmeanexp: 10 log((e^-0.03 + e^-0.1) / 2) = 10 log(0.937642) = -0.643876
    scores = torch.tensor([-0.2, -0.4, -0.3, -1.0], dtype=torch.float64, requires_grad=True)
    J = objective(scores, [1.0, 1.0, 0.0, 0.0], [1, 5, 3, 3], max_len=10)
    assert J.item() == pytest.approx(-0.203597 + 0.643876, abs=1e-6) == pytest.approx(0.440279, abs=1e-6)
    J.sum().backward()
    # dJ/ds_pos = w; dJ/ds_neg = -softmax(s_neg / tau) = -[e^-0.03, e^-0.1] / (e^-0.03 + e^-0.1)
    expected = [0.982014, 0.017986, -0.517493, -0.482507]
    assert scores.grad.tolist() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------- 2. sign property


def test_every_correct_response_is_pushed_up_and_every_incorrect_one_down():
    torch.manual_seed(0)
    G, Q = 8, 200
    correct = (torch.rand(Q, G) < torch.rand(Q, 1)).float().view(-1)  # accuracy varies by group
    lengths = torch.randint(1, 129, (Q * G,))
    scores = (-3 * torch.rand(Q * G)).requires_grad_()
    weights = positive_weights(lengths, correct, 128, 0.1, G)
    drpo_objective(scores, correct, weights, 10.0, G).sum().backward()
    valid = (correct.view(Q, G).sum(1) % G != 0).repeat_interleave(G)
    assert 0 < valid.float().mean() < 1  # both kinds of group occur
    grad = scores.grad
    assert (grad[valid & (correct > 0)] >= 0).all() and (grad[valid & (correct == 0)] < 0).all()
    assert (grad[~valid] == 0).all()


def test_a_long_correct_response_gets_a_negative_grpo_advantage_but_a_positive_drpo_push():
    # 3 short correct (16 tokens), 1 long correct (96), 4 short wrong (16); budget 128.
    correct = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])
    lengths = torch.tensor([16, 16, 16, 96, 16, 16, 16, 16])
    # GRPO with an additive length penalty: rewards 0.875 x3, 0.25, -0.125 x4; mean 0.296875 > 0.25
    rewards = correct - lengths / 128
    assert group_advantages(rewards, 8)[3] < 0
    scores = torch.full((8,), -1.0, requires_grad=True)
    weights = positive_weights(lengths, correct, 128, 0.1, 8)
    drpo_objective(scores, correct, weights, 10.0, 8).sum().backward()
    assert scores.grad[3] > 0 and scores.grad[3] < scores.grad[0]  # pushed up, less than the short ones


# ---------------------------------------------------------------------------- 3. limits


def disco_logl(scores, correct, tau):
    """DisCO with the logL score, by hand: mean over O+ of s, minus tau log mean over O- of exp(s / tau)."""
    pos = [s for s, c in zip(scores, correct) if c]
    neg = [s for s, c in zip(scores, correct) if not c]
    return sum(pos) / len(pos) - tau * math.log(sum(math.exp(s / tau) for s in neg) / len(neg))


def test_huge_lambda_gives_uniform_weights_and_the_disco_logl_objective():
    s, correct = [-0.2, -0.4, -0.9, -0.3, -1.0, -0.7], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    lengths = [2, 50, 120, 7, 9, 100]
    weights = positive_weights(torch.tensor(lengths), torch.tensor(correct), 128, 1e9, 6)
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0, 0, 0], abs=1e-7)
    J = objective(torch.tensor(s, dtype=torch.float64), correct, lengths, 128, lam=1e9, group_size=6)
    assert J.item() == pytest.approx(disco_logl(s, correct, 10.0), abs=1e-6)  # w in float32
    assert J.item() != pytest.approx(objective(torch.tensor(s), correct, lengths, 128, group_size=6).item(), abs=1e-3)


@pytest.mark.parametrize("lam", [1e-3, 0.1, 10.0])
def test_equal_lengths_give_uniform_weights_whatever_lambda(lam):
    weights = positive_weights(torch.tensor([40, 40, 40, 3]), torch.tensor([1.0, 1, 1, 0]), 128, lam, 4)
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0], abs=1e-6)


def test_small_lambda_keeps_only_the_shortest_correct_response_without_overflow():
    weights = positive_weights(torch.tensor([10, 20, 30, 3]), torch.tensor([1.0, 1, 1, 0]), 128, 1e-3, 4)
    assert weights.tolist() == pytest.approx([1, 0, 0, 0], abs=1e-6)  # raw exp(r_l / 1e-3) overflows float32


def test_all_correct_and_all_wrong_groups_give_zero_loss_and_zero_gradient():
    logprobs = torch.randn(8, 5, requires_grad=True)
    mask = torch.ones(8, 5)
    correct = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])  # group 1 all correct, group 2 all wrong
    loss, _ = drpo_loss(logprobs, logprobs.detach(), mask, correct, 8, lam=0.1, tau=10.0, delta=1e-4,
                        beta=1e3, group_size=4)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logprobs.grad, torch.zeros(8, 5))


def test_the_length_reward_uses_the_budget_not_the_padded_width():
    torch.manual_seed(0)
    logprobs, mask = -torch.rand(4, 6), torch.tensor([[1.0] * 2 + [0] * 4, [1] * 6, [1] * 3 + [0] * 3, [1] * 4 + [0] * 2])
    correct = torch.tensor([1.0, 1, 0, 0])
    kwargs = dict(lam=0.1, tau=10.0, delta=1e-4, beta=1e3, group_size=4)
    narrow, _ = drpo_loss(logprobs, logprobs, mask, correct, 8, **kwargs)
    pad = torch.zeros(4, 10)  # the same responses in a rollout padded to 16 columns
    wide, _ = drpo_loss(torch.cat([logprobs, pad], 1), torch.cat([logprobs, pad], 1), torch.cat([mask, pad], 1),
                        correct, 8, **kwargs)
    other_budget, _ = drpo_loss(logprobs, logprobs, mask, correct, 16, **kwargs)
    assert wide.item() == pytest.approx(narrow.item(), abs=1e-7) and other_budget.item() != narrow.item()


# ---------------------------------------------------------------------------- 4. trust region


def test_trust_region_is_zero_inside_the_budget_and_beta_times_the_excess_beyond():
    for kl_value in (-0.01, 0.0, 1e-4):  # k1 can be negative
        kl = torch.tensor(kl_value, dtype=torch.float64, requires_grad=True)
        penalty = trust_region_penalty(kl, delta=1e-4, beta=1e3)
        penalty.backward()
        assert penalty.item() == 0.0 and kl.grad.item() == 0.0
    kl = torch.tensor(1e-4 + 1e-3, dtype=torch.float64, requires_grad=True)
    penalty = trust_region_penalty(kl, delta=1e-4, beta=1e3)
    penalty.backward()
    assert kl.grad.item() == pytest.approx(1.0)  # beta (KL - delta) = 1e3 * 1e-3
    assert penalty.item() == pytest.approx(0.5e-3)  # (beta/2) (1e-3)^2


# ---------------------------------------------------------------------------- 5. normaliser


def test_adding_invalid_groups_halves_the_policy_part_but_not_the_penalty():
    torch.manual_seed(0)
    kwargs = dict(lam=0.1, tau=10.0, delta=1e-4, beta=1e3, group_size=4)
    logprobs, mask = -torch.rand(8, 6), (torch.rand(8, 6) > 0.3).float()
    correct = torch.tensor([1.0, 0, 1, 0, 1, 1, 1, 1])  # one valid group, one all-correct group
    old = logprobs + 0.01  # every token's k1 is 0.01: the added rows leave KL_old unchanged
    one, m1 = drpo_loss(logprobs[:4], old[:4], mask[:4], correct[:4], 8, **kwargs)
    two, m2 = drpo_loss(logprobs, old, mask, correct, 8, **kwargs)
    penalty = 0.5 * 1e3 * (0.01 - 1e-4) ** 2
    assert m1["drpo/penalty"] == pytest.approx(penalty, rel=1e-5) == m2["drpo/penalty"]
    assert m1["drpo/objective"] != 0
    assert (two.item() - penalty) == pytest.approx((one.item() - penalty) / 2, rel=1e-5)


# ---------------------------------------------------------------------------- the tiny model


def setup(**kwargs):
    policy = tiny(**SMALL, device="cpu")
    opt = torch.optim.SGD(policy.model.parameters(), lr=0.1)
    task = AlternatingTask(num_train=16, num_validation=2, num_test=2)
    state = TrainState(policy.model, policy.tokenizer, opt, None, task)
    algo = DRPO(WeightedSum({"c": Correctness()}, {"c": 1.0}), group_size=4, max_new_tokens=8, **kwargs)
    return algo, state


def test_one_step_changes_the_policy_and_counts_prompts():
    algo, state = setup(minibatches=1)
    before = copy.deepcopy(state.model.state_dict())
    torch.manual_seed(0)
    batch = algo.make_batch(state.task.split("train")[:2], state)
    assert batch["correct"].tolist() == [1.0, 0.0] * 4  # the checker's alternation (both groups valid: below)
    assert batch["num_targets"] == 2  # prompts, not tokens
    loss, metrics = algo.loss(batch, state)
    loss.backward()
    state.optimizer.step()
    assert torch.isfinite(loss) and metrics["rl/valid_groups"] == 1.0 and metrics["drpo/kl_old"] == 0.0
    assert metrics["train/loss"] == pytest.approx(-metrics["drpo/objective"])
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())


def test_bad_values_are_one_clear_error():
    reward = WeightedSum({"c": Correctness()}, {"c": 1.0})
    with pytest.raises(RlxError, match="algo.lam"):
        DRPO(reward, lam=0.0)
    with pytest.raises(RlxError, match="algo.delta"):
        DRPO(reward, delta=-1.0)


def test_drpo_runs_in_the_loop_and_the_trust_region_sees_the_second_minibatch(tmp_path):
    cfg = small_config("algo=drpo", "algo.group_size=2", "algo.max_new_tokens=8", "algo.minibatches=2",
                       "trainer.max_steps=2", "trainer.micro_batch_size=2", "optimizer.lr=1e-2",
                       "data._target_=tests.algorithms.test_drpo.AlternatingTask")
    run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    keys = {"rl/valid_groups", "drpo/max_weight", "drpo/correct_len", "drpo/kl_old", "rl/entropy", "reward/mean"}
    assert len(rows) == 2 and keys <= set(rows[0])
    assert rows[0]["drpo/kl_old"] == 0.0 and rows[1]["drpo/kl_old"] != 0.0  # the behaviour policy, then a moved one
