"""RPO against the paper note's toy batch (both NLL reductions, not TRL's pooled CE), its
gradient by hand, the eta = 0 limit that is DPO bit for bit, and a run of the loop."""
import json
import math

import pytest
import torch

from rlx.algorithms._pairs import policy_logps
from rlx.algorithms.dpo import DPO
from rlx.algorithms.rpo import RPO, rpo_loss
from rlx.data.preferences import ReasoningPairs
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningPairs(num_train=16, num_validation=2, num_test=2)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# The note's toy batch (beta 0.1): A h = (-12+13) - (-15+14) = 2, |y_w| 4; B h = -0.5 - 0.5 = -1, |y_w| 5.
TOY = (t(-12.0, -20.0), t(-15.0, -18.0), t(-13.0, -19.5), t(-14.0, -18.5), t(4, 5))


def test_sum_variant_by_hand():
    losses, nll, _, _ = rpo_loss(*TOY, beta=0.1, eta=0.005)
    # softplus(-0.2) + 0.0005 * 12 = 0.604139; softplus(0.1) + 0.0005 * 20 = 0.754397
    assert losses.tolist() == pytest.approx([0.604139, 0.754397], abs=1e-6)
    assert losses.mean().item() == pytest.approx(0.679268, abs=1e-6)
    assert nll.tolist() == [12.0, 20.0]


def test_token_mean_variant_by_hand_is_not_trls_pooled_ce():
    losses, nll, _, _ = rpo_loss(*TOY, beta=0.1, eta=0.2, nll_reduction="token_mean")
    # per-sequence means 12/4 = 3 and 20/5 = 4, then the batch mean 3.5: 0.671268 + 0.2 * 3.5
    assert nll.tolist() == [3.0, 4.0]
    assert losses.mean().item() == pytest.approx(1.371268, abs=1e-6)
    pooled = 0.671268 + 0.2 * (12 + 20) / (4 + 5)  # TRL's "sft" term pools all chosen tokens: 1.382379
    assert pooled == pytest.approx(1.382379, abs=1e-6)
    assert abs(losses.mean().item() - pooled) > 0.01


def test_gradient_on_the_chosen_log_prob_by_hand():
    chosen = t(-12.0).requires_grad_()
    rpo_loss(chosen, t(-15.0), t(-13.0), t(-14.0), t(4), beta=0.1, eta=0.005)[0].sum().backward()
    # -beta * sigma(-beta h) - eta * beta = -0.1 * sigma(-0.2) - 0.0005 = -0.0455166
    assert chosen.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)) - 0.0005, abs=1e-7)
    assert chosen.grad.item() == pytest.approx(-0.0455166, abs=1e-7)


def test_large_eta_is_dominated_by_sft():
    # eta 1e4 (coef 1e3): the loss is ~ the NLL term, its gradient ~ -coef on the chosen side
    chosen = t(-12.0).requires_grad_()
    losses = rpo_loss(chosen, t(-15.0), t(-13.0), t(-14.0), t(4), beta=0.1, eta=1e4)[0]
    losses.sum().backward()
    assert losses.item() == pytest.approx(1e3 * 12, rel=1e-4)
    assert chosen.grad.item() == pytest.approx(-1e3, rel=1e-4)


def test_bad_settings_are_clear_errors():
    reference = tiny(**SMALL, device="cpu")
    with pytest.raises(RlxError, match="reference"):
        RPO(None)
    with pytest.raises(RlxError, match="nll_reduction"):
        RPO(reference, nll_reduction="mean")
    with pytest.raises(RlxError, match="eta"):
        RPO(reference, eta=-1.0)


def setup(algo_cls, **kwargs):
    policy = tiny(**SMALL, device="cpu")
    with torch.no_grad():  # move the policy off the reference so h != 0 and the gradients are generic
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    state = TrainState(policy.model, policy.tokenizer, None, None, TASK)
    return algo_cls(tiny(**SMALL, device="cpu"), **kwargs), state


def loss_and_grads(algo, state, examples):
    state.model.zero_grad()
    loss, metrics = algo.loss(algo.make_batch(examples, state), state)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in state.model.parameters()], metrics


@pytest.mark.parametrize("reduction", ["sum", "token_mean"])
def test_eta_zero_is_dpo_bit_for_bit(reduction):
    examples = TASK.split("train")[:4]
    rpo_loss_, rpo_grads, metrics = loss_and_grads(*setup(RPO, eta=0.0, nll_reduction=reduction), examples)
    dpo_loss_, dpo_grads, _ = loss_and_grads(*setup(DPO), examples)
    assert dpo_loss_.item() != pytest.approx(math.log(2), abs=1e-4)  # the policy differs from the reference
    assert torch.equal(rpo_loss_, dpo_loss_)
    assert all(torch.equal(a, b) for a, b in zip(rpo_grads, dpo_grads))
    assert metrics["rpo/nll"] > 0 and metrics["rpo/logps_chosen"] < 0


def test_the_nll_term_raises_the_chosen_log_prob_more_than_dpo():
    # one SGD step: the added -coef * d logp(y_w) pushes the chosen log-prob up further than DPO alone
    examples = TASK.split("train")[:4]
    after = {}
    for name, cls, kwargs in (("dpo", DPO, {}), ("rpo", RPO, {"eta": 5.0})):
        algo, state = setup(cls, **kwargs)
        loss_and_grads(algo, state, examples)
        with torch.no_grad():
            for p in state.model.parameters():
                p.sub_(0.05 * p.grad)
            after[name] = policy_logps(state.model, algo.make_batch(examples, state))[0].mean().item()
    assert after["rpo"] > after["dpo"]


def test_rpo_runs_in_the_loop(tmp_path):
    cfg = small_config("algo=rpo", "data=reasoning_pairs", "data.num_train=32", "data.num_validation=4",
                       "data.num_test=4", "trainer.max_steps=2", "trainer.micro_batch_size=2")
    run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "rpo/nll", "rpo/logps_chosen", "rpo/reward_margin"} <= set(rows[0])
    # step 1, policy == reference: log 2 + 0.005 * 0.1 * the mean summed NLL of the chosen responses
    assert rows[0]["train/loss"] == pytest.approx(math.log(2) + 0.0005 * rows[0]["rpo/nll"], abs=1e-4)
