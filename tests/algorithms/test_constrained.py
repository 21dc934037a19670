"""Constrained RLHF (rlx/algorithms/constrained.py): the paper note's mixed-advantage values, the
multipliers' direction, the fixed-multiplier limit against GRPO on the weighted reward, and exact
resume of the multipliers."""
import pytest
import torch

from rlx.algorithms.constrained import Constrained, mixed_advantage, multiplier_step, multipliers
from rlx.algorithms.grpo import GRPO
from rlx.data.reasoning import ReasoningTask
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import WeightedSum
from rlx.state import TrainState

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningTask(num_train=16, num_validation=2, num_test=2)


class CharCount:
    """A term that varies between responses: how often `char` appears."""

    def __init__(self, char: str):
        self.char = char

    def __call__(self, responses, examples, task, lengths=None):
        return torch.tensor([float(r.count(self.char)) for r in responses])


def two_terms() -> WeightedSum:
    return WeightedSum({"a": CharCount("1"), "b": CharCount("+")}, {"a": 1.0, "b": 1.0})


def test_mixed_advantage_by_hand():
    """The note: mu = sigmoid(0) = 0.5 each, A_KL = 1, A = (2, -1): (2 - 1) * 1 + 0.5 * 2 - 0.5 = 1.5;
    tanh(0) = 0: 2 * A_KL = 2."""
    kl, terms = torch.tensor([1.0]), torch.tensor([[2.0], [-1.0]])
    assert mixed_advantage(kl, terms, multipliers(torch.zeros(2), equality=False)).item() == pytest.approx(1.5)
    assert mixed_advantage(kl, terms, multipliers(torch.zeros(2), equality=True)).item() == pytest.approx(2.0)


@pytest.mark.parametrize("equality", [True, False])
def test_multipliers_move_against_the_slack(equality):
    """A term past its threshold (0.30 vs 0.238) loses weight, one short of it (0.20) gains weight."""
    z, buf = torch.zeros(1), torch.zeros(1)
    past, _ = multiplier_step(z, buf, torch.tensor([0.30 - 0.238]), equality, lr=0.1, momentum=0.1)
    short, _ = multiplier_step(z, buf, torch.tensor([0.20 - 0.238]), equality, lr=0.1, momentum=0.1)
    assert past.item() < 0 < short.item()


def test_the_step_is_sgd_with_momentum_on_the_lagrangian():
    """multiplier_step against torch.optim.SGD on l = sum mu(z) * slack, by autograd."""
    slack = torch.tensor([0.3, -0.2])
    z = torch.tensor([0.4, -0.1], requires_grad=True)
    opt = torch.optim.SGD([z], lr=0.1, momentum=0.1)
    mine, buf = z.detach().clone(), torch.zeros(2)
    for _ in range(3):
        opt.zero_grad()
        (torch.tanh(z) * slack).sum().backward()
        opt.step()
        mine, buf = multiplier_step(mine, buf, slack, True, lr=0.1, momentum=0.1)
    torch.testing.assert_close(mine, z.detach())


def test_satisfied_equality_constraints_turn_negative():
    z, buf = torch.zeros(1), torch.zeros(1)
    for _ in range(30):
        z, buf = multiplier_step(z, buf, torch.tensor([0.2]), True, lr=0.1, momentum=0.1)
    assert multipliers(z, True).item() < -0.05  # pushed back down, not merely ignored
    z, buf = torch.zeros(1), torch.zeros(1)
    for _ in range(30):
        z, buf = multiplier_step(z, buf, torch.tensor([0.2]), False, lr=0.1, momentum=0.1)
    assert 0 < multipliers(z, False).item() < 0.5


def _state():
    policy = tiny(**SMALL, device="cpu")
    return TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.1), None, TASK)


def test_fixed_multipliers_are_grpo_on_the_weighted_reward():
    """The note's limit: with the multipliers fixed (lr 0), no KL (beta 0) and no per-stream
    normalisation, A_mix = sum_i mu_i A_i is the group-centred advantage of sum_i mu_i r_i, which
    GRPO (scale=none) computes from that weighted reward."""
    algo = Constrained(two_terms(), {"a": 1.0, "b": 1.0}, beta=0.0, lagrange_lr=0.0, normalize=False,
                       group_size=4, max_new_tokens=12, equality=False)
    mu = multipliers(algo.z, equality=False)
    weighted = WeightedSum({"a": CharCount("1"), "b": CharCount("+")}, {"a": mu[0].item(), "b": mu[1].item()})
    grpo = GRPO(weighted, group_size=4, max_new_tokens=12, scale="none")
    torch.manual_seed(0)
    mine = algo.make_batch(TASK.split("train")[:3], _state())
    torch.manual_seed(0)
    theirs = grpo.make_batch(TASK.split("train")[:3], _state())
    assert theirs["advantages"].abs().max() > 0
    torch.testing.assert_close(mine["advantages"], theirs["advantages"], rtol=1e-5, atol=1e-6)
    state = _state()
    torch.testing.assert_close(algo.loss(mine, state)[0], grpo.loss(theirs, state)[0], rtol=1e-5, atol=1e-7)


def test_the_rollout_steps_the_multipliers_and_logs_them():
    algo = Constrained(two_terms(), {"a": 100.0}, beta=0.0, group_size=4, max_new_tokens=12)
    z0 = algo.z.clone()
    torch.manual_seed(0)
    batch = algo.make_batch(TASK.split("train")[:2], _state())
    assert algo.z[0] > z0[0]  # far short of 100 ones: its weight grows
    assert batch["metrics"]["constraint/slack_a"] < 0 and "constraint/mu_a" in batch["metrics"]


def test_settings_are_checked():
    with pytest.raises(RlxError, match="thresholds"):
        Constrained(two_terms(), {"c": 1.0}, beta=0.0)
    with pytest.raises(RlxError, match="reference"):
        Constrained(two_terms(), {"a": 1.0}, beta=0.1)


def test_runs_in_the_loop_and_resumes_the_multipliers_exactly(tmp_path):
    from tests.support import straight_and_resumed

    over = ["algo=constrained", "model=tiny", "reward=correct_format", "algo.max_new_tokens=8", "algo.group_size=4",
            "algo.thresholds.correct=0.5", "+algo.thresholds.format=0.9", "optimizer.lr=1e-3", "algo.minibatches=2"]
    full, resumed, a, b = straight_and_resumed(tmp_path, over, steps=4, cut=1)
    assert full["constraint/mu_correct"] == resumed["constraint/mu_correct"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
