"""SmPO (smoothed-label DPO) against the paper note's numbers, its limits (alpha = gamma = k = 1 is
DPO bit for bit; a tie is log 2 with zero gradient; the pull at h = 0 is linear in 2*alpha - 1),
how it differs from cDPO label smoothing, relabelling, and a loop run over a saved RM checkpoint."""
import json
import math

import pytest
import torch

from rlx.algorithms.dpo import DPO, dpo_loss
from rlx.algorithms.smpo import SmPO, smoothed_alpha, smpo_loss
from rlx.data.preferences import ReasoningPairs
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningPairs(num_train=16, num_validation=2, num_test=2)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# The rpo.md pairs (beta 0.1): h_theta A = 2, B = -1
TOY = (t(-12.0, -20.0), t(-15.0, -18.0), t(-13.0, -19.5), t(-14.0, -18.5))
SIGMA = 1 / (1 + math.exp(-1))  # alpha for r_w = 1, r_l = 0, tau_rm = 1: 0.731059


def test_alpha_from_rewards():
    assert smoothed_alpha(t(1.0)).item() == pytest.approx(0.731059, abs=1e-6)
    assert smoothed_alpha(t(1.0), tau_rm=2.0).item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=1e-12)


@pytest.mark.parametrize("k,a,b,mean", [(1.0, 0.648003, 0.716520, 0.682261), (10.0, 0.334209, 0.950666, 0.642437)])
def test_note_values(k, a, b, mean):
    alpha = smoothed_alpha(t(1.0, 1.0))
    losses, _, _ = smpo_loss(*TOY, alpha, beta=0.1, k=k)
    # k 1: softplus(-0.0462117 * 2) = 0.648003 and softplus(0.0462117) = 0.716520
    assert losses.tolist() == pytest.approx([a, b], abs=1e-6)
    assert losses.mean().item() == pytest.approx(mean, abs=1e-6)


def test_alpha_one_is_dpo_bit_for_bit():
    chosen, rejected = t(-12.0, -20.0).float(), t(-15.0, -18.0).float()
    smpo = smpo_loss(chosen, rejected, t(-13.0, -19.5).float(), t(-14.0, -18.5).float(), torch.ones(2), beta=0.1)
    dpo = dpo_loss(chosen, rejected, t(-13.0, -19.5).float(), t(-14.0, -18.5).float(), beta=0.1)
    assert all(torch.equal(s, d) for s, d in zip(smpo, dpo))


def test_a_tie_is_log_2_with_zero_gradient():
    chosen, rejected = t(-12.0, -20.0).requires_grad_(), t(-15.0, -18.0).requires_grad_()
    alpha = smoothed_alpha(t(0.0, 0.0))  # r_w = r_l
    losses, _, _ = smpo_loss(chosen, rejected, t(-13.0, -19.5), t(-14.0, -18.5), alpha, beta=0.1, k=10.0)
    losses.sum().backward()
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-12)
    assert chosen.grad.tolist() == [0.0, 0.0] and rejected.grad.tolist() == [0.0, 0.0]


def test_gradient_at_zero_margin_is_linear_in_two_alpha_minus_one():
    # at h = 0: d/dh softplus(-s beta h) = -s beta sigma(0) = -s beta / 2, s = 2 alpha - 1
    for alpha in (0.55, 0.6, 0.8, 1.0, 0.3):
        chosen = t(-2.0).requires_grad_()
        smpo_loss(chosen, t(-3.0), t(-2.0), t(-3.0), t(alpha), beta=0.1)[0].sum().backward()
        assert chosen.grad.item() == pytest.approx(-(2 * alpha - 1) * 0.1 / 2, abs=1e-12)


def grad_on_h(loss_fn, h: float) -> float:
    chosen = t(h).requires_grad_()  # the reference and rejected log-probs are 0, so h_theta = chosen
    loss_fn(chosen, t(0.0), t(0.0), t(0.0))[0].sum().backward()
    return chosen.grad.item()


def test_it_is_not_cdpo_label_smoothing():
    # a tie, alpha = 1/2: SmPO does not care where h is; cDPO with eps = 1/2 still pulls h back to 0
    smpo_tie = grad_on_h(lambda *x: smpo_loss(*x, t(0.5), beta=0.1), 3.0)
    cdpo_tie = grad_on_h(lambda *x: dpo_loss(*x, beta=0.1, label_smoothing=0.5), 3.0)
    assert smpo_tie == 0.0
    # -beta [(1 - eps) sigma(-beta h) - eps sigma(beta h)] = 0.05 tanh(0.15) = 0.0074443
    assert cdpo_tie == pytest.approx(0.05 * math.tanh(0.15), abs=1e-9) and cdpo_tie > 0.007
    # a near-tie, alpha 0.6 vs eps 0.4: cDPO's optimum is the finite h* = ln(0.6/0.4)/beta = 4.0547, where
    # SmPO still pushes up: -beta s sigma(-s beta h*), s = 0.2: -0.02 * sigma(-0.081093) = -0.0095947
    h_star = math.log(0.6 / 0.4) / 0.1
    assert grad_on_h(lambda *x: dpo_loss(*x, beta=0.1, label_smoothing=0.4), h_star) == pytest.approx(0.0, abs=1e-12)
    assert grad_on_h(lambda *x: smpo_loss(*x, t(0.6), beta=0.1), h_star) == pytest.approx(-0.0095947, abs=1e-7)


def test_bad_settings_are_clear_errors():
    reference = tiny(**SMALL, device="cpu")
    with pytest.raises(RlxError, match="reward model"):
        SmPO(reference, None)
    with pytest.raises(RlxError, match="tau_rm"):
        SmPO(reference, lambda *a: None, tau_rm=0.0)
    with pytest.raises(RlxError, match="gamma"):
        SmPO(reference, lambda *a: None, gamma=0.0)


class LabelScorer:
    """Scores the data's chosen response `chosen` and its rejected one `rejected` (fixed rewards)."""

    def __init__(self, chosen: float, rejected: float):
        self.chosen, self.rejected = chosen, rejected

    def __call__(self, responses, examples, task):
        return torch.tensor([self.chosen if r == ex["chosen"] else self.rejected for r, ex in zip(responses, examples)])


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


def test_a_certain_rm_is_dpo_bit_for_bit_on_the_tiny_model():
    examples = TASK.split("train")[:4]
    loss, grads, metrics = loss_and_grads(*setup(SmPO, LabelScorer(100.0, 0.0)), examples)  # sigma(100) = 1 in fp32
    dpo, dpo_grads, _ = loss_and_grads(*setup(DPO), examples)
    assert metrics["smpo/alpha_mean"] == 1.0 and dpo.item() != pytest.approx(math.log(2), abs=1e-4)
    assert torch.equal(loss, dpo) and all(torch.equal(a, b) for a, b in zip(grads, dpo_grads))


def swapped(examples):
    return [{**ex, "chosen": ex["rejected"], "rejected": ex["chosen"]} for ex in examples]


def test_relabel_trains_on_the_rms_winner():
    # an RM that prefers every rejected response by 2: relabelled, it is SmPO on the swapped pairs with margin +2
    examples, gamma = TASK.split("train")[:4], 0.8
    relabelled, _, _ = loss_and_grads(*setup(SmPO, LabelScorer(0.0, 2.0), gamma=gamma, relabel=True), examples)
    on_swapped, _, _ = loss_and_grads(*setup(SmPO, LabelScorer(2.0, 0.0), gamma=gamma), swapped(examples))
    kept, _, _ = loss_and_grads(*setup(SmPO, LabelScorer(0.0, 2.0), gamma=gamma), examples)
    assert relabelled.item() == pytest.approx(on_swapped.item(), abs=1e-6)
    assert kept.item() != pytest.approx(relabelled.item(), abs=1e-4)
    # with gamma = 1 relabelling changes nothing: 2 sigma(-z) - 1 = -(2 sigma(z) - 1) and h flips sign
    one, _, _ = loss_and_grads(*setup(SmPO, LabelScorer(0.0, 2.0), relabel=True), examples)
    other, _, _ = loss_and_grads(*setup(SmPO, LabelScorer(0.0, 2.0)), examples)
    assert one.item() == pytest.approx(other.item(), abs=1e-6)


def test_smpo_runs_in_the_loop_with_a_reward_model_checkpoint(tmp_path):
    rm = tiny(**SMALL, device="cpu")
    rm.model.save_pretrained(tmp_path / "rm")
    rm.tokenizer.save_pretrained(tmp_path / "rm")
    cfg = small_config("algo=smpo", f"algo.reward_model.checkpoint={tmp_path / 'rm'}", "data=reasoning_pairs",
                       "data.num_train=32", "data.num_validation=4", "data.num_test=4", "trainer.max_steps=2",
                       "trainer.micro_batch_size=2")
    run_training(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "smpo/alpha_mean", "smpo/scale_mean", "smpo/reward_margin"} <= set(rows[0])
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference: h = 0
    assert 0.0 < rows[0]["smpo/alpha_mean"] < 1.0 and rows[0]["smpo/alpha_mean"] != 0.5
