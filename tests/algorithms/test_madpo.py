"""MADPO against the paper note's weight table and toy losses, the weight's continuity and its
w(0) = 1, the DPO limits (weight=none, zero RM margins) bit for bit, and a loop run whose
reward model is a real `RewardModel` over a checkpoint saved here."""
import json
import math

import pytest
import torch

from rlx.algorithms.dpo import DPO, dpo_loss
from rlx.algorithms.madpo import MADPO, margin_scale, margin_weight
from rlx.data.preferences import ReasoningPairs
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningPairs(num_train=16, num_validation=2, num_test=2)
TAU = math.log(999)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# The note's table (c_max 2, c_min 0.5, lambda 1, tau ln 999); c(tau) = 1, c(0) = 0.5 + 1.5 / (1 + 2/999)
@pytest.mark.parametrize("h,c,w", [(0.0, 1.997003, 1.0), (0.5, 1.995065, 1.173688), (2.0, 1.978134, 1.114019),
                                   (TAU, 1.0, 1.0), (8.0, 0.715273, 0.997072), (-2.0, 1.978134, 0.157506)])
def test_weight_table(h, c, w):
    assert margin_scale(t(abs(h))).item() == pytest.approx(c, abs=1e-6)
    assert margin_weight(t(h)).item() == pytest.approx(w, abs=1e-6)


def test_strongly_negative_margins_are_capped_at_one():
    # h = -8 <= -tau: w = 1 (uncapped it would be sigma(-8 c)/sigma(-8) with c(8) = 0.715: > 9)
    assert margin_weight(t(-8.0, -TAU, -50.0)).tolist() == [1.0, 1.0, 1.0]
    uncapped = (1 / (1 + math.exp(8 * 0.715273))) / (1 / (1 + math.exp(8)))
    assert uncapped > 9


def test_weight_is_continuous_at_minus_tau_and_one_at_zero():
    inside = margin_weight(t(-TAU + 1e-7)).item()  # the ratio branch, c(tau) = 1: sigma(-tau)/sigma(-tau)
    assert inside == pytest.approx(1.0, abs=1e-6)
    for c_max, c_min in ((2.0, 0.5), (4.0, 0.25), (1.5, 0.9)):
        assert margin_weight(t(0.0), c_max=c_max, c_min=c_min).item() == 1.0  # sigma(0)/sigma(0)


def test_toy_losses_by_hand():
    # the rpo.md pairs (beta 0.1: h_theta 2 and -1), RM margins 0.5 and 8
    losses, _, _ = dpo_loss(t(-12.0, -20.0), t(-15.0, -18.0), t(-13.0, -19.5), t(-14.0, -18.5), beta=0.1)
    weighted = margin_weight(t(0.5, 8.0)) * losses
    # 1.173688 * 0.598139 = 0.702029, 0.997072 * 0.744397 = 0.742217
    assert weighted.tolist() == pytest.approx([0.702029, 0.742217], abs=1e-6)
    assert weighted.mean().item() == pytest.approx(0.722123, abs=1e-6)


def test_bad_settings_are_clear_errors():
    reference = tiny(**SMALL, device="cpu")
    with pytest.raises(RlxError, match="reward model"):
        MADPO(reference, None)
    with pytest.raises(RlxError, match="c_min < 1 < c_max"):
        MADPO(reference, lambda *a: None, c_max=1.0, c_min=1.0)
    with pytest.raises(RlxError, match="weight"):
        MADPO(reference, lambda *a: None, weight="beta")
    MADPO(reference, lambda *a: None, c_max=1.0, c_min=1.0, weight="none")  # the limit needs no schedule


class FixedRewards:
    """A scorer with fixed rewards: `per_char` times the response's length (chosen and rejected differ)."""

    def __init__(self, per_char: float):
        self.per_char = per_char

    def __call__(self, responses, examples, task):
        return torch.tensor([self.per_char * len(r) for r in responses])


def setup(algo_cls, *args, **kwargs):
    policy = tiny(**SMALL, device="cpu")
    with torch.no_grad():  # move the policy off the reference so h != 0
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    state = TrainState(policy.model, policy.tokenizer, None, None, TASK)
    return algo_cls(tiny(**SMALL, device="cpu"), *args, **kwargs), state


def loss_and_grads(algo, state, examples):
    state.model.zero_grad()
    loss, metrics = algo.loss(algo.make_batch(examples, state), state)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in state.model.parameters()], metrics


@pytest.mark.parametrize("scorer,weight", [(FixedRewards(0.3), "none"), (FixedRewards(0.0), "margin")])
def test_dpo_limit_bit_for_bit(scorer, weight):
    examples = TASK.split("train")[:4]
    loss, grads, metrics = loss_and_grads(*setup(MADPO, scorer, weight=weight), examples)
    dpo, dpo_grads, _ = loss_and_grads(*setup(DPO), examples)
    assert dpo.item() != pytest.approx(math.log(2), abs=1e-4)
    assert torch.equal(loss, dpo) and all(torch.equal(a, b) for a, b in zip(grads, dpo_grads))
    assert metrics["madpo/weight_mean"] == 1.0


def test_margins_change_the_loss():
    # 0.3 per character: margins of several units, where w is far from 1, so the loss is not DPO's
    examples = TASK.split("train")[:4]
    loss, _, metrics = loss_and_grads(*setup(MADPO, FixedRewards(0.3)), examples)
    dpo, _, _ = loss_and_grads(*setup(DPO), examples)
    assert metrics["madpo/weight_mean"] != pytest.approx(1.0, abs=1e-3)
    assert loss.item() != pytest.approx(dpo.item(), abs=1e-5)


def test_madpo_runs_in_the_loop_with_a_reward_model_checkpoint(tmp_path):
    rm = tiny(**SMALL, device="cpu")
    rm.model.save_pretrained(tmp_path / "rm")
    rm.tokenizer.save_pretrained(tmp_path / "rm")
    cfg = small_config("algo=madpo", f"algo.reward_model.checkpoint={tmp_path / 'rm'}", "data=reasoning_pairs",
                       "data.num_train=32", "data.num_validation=4", "data.num_test=4", "trainer.max_steps=2",
                       "trainer.micro_batch_size=2")
    run_training(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "madpo/weight_mean", "madpo/rm_margin_mean", "madpo/reward_margin"} <= set(rows[0])
    # step 1, policy == reference: every pair's DPO loss is log 2, so the loss is log 2 times the mean weight
    assert rows[0]["train/loss"] == pytest.approx(math.log(2) * rows[0]["madpo/weight_mean"], abs=1e-4)
    assert rows[0]["madpo/rm_margin_mean"] != 0.0  # a real, untrained RM scores chosen and rejected apart
