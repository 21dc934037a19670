"""NPO's loss against the paper note's hand-computed values, its DPO and gradient-ascent limits,
and the forget/retain split of the reasoning task."""
import math

import pytest
import torch

from rlx.algorithms.dpo import dpo_loss
from rlx.algorithms.npo import npo_loss
from rlx.data.unlearn import ReasoningUnlearn


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_loss_and_weight_by_hand():
    # beta 0.1: u = 0 -> 20 ln 2 = 13.862944; u = -10 -> 20 softplus(-1) = 6.265234; u = 5 -> 19.481540
    u = t(0.0, -10.0, 5.0).requires_grad_()
    losses = npo_loss(u, beta=0.1)
    assert losses.tolist() == pytest.approx([13.862944, 6.265234, 19.481540], abs=1e-5)
    losses.sum().backward()
    # dL/du = 2 sigma(beta u): 1 exactly at u = 0, 2 sigma(-1) = 0.537883, 2 sigma(0.5) = 1.244919
    assert u.grad.tolist() == pytest.approx([1.0, 0.537883, 1.244919], abs=1e-6)


def test_gradient_ascent_limit_by_hand():
    # L - (2/beta) ln 2 -> u as beta -> 0: for u = -10, -9.7501 at beta 1e-2 and -9.9975 at beta 1e-4
    u = torch.tensor([-10.0], dtype=torch.float64)
    for beta, expected in ((1e-2, -9.7501), (1e-4, -9.9975)):
        assert (npo_loss(u, beta) - 2 / beta * math.log(2)).item() == pytest.approx(expected, abs=1e-4)


def test_bounded_below_by_zero():
    u = torch.linspace(-200, 50, 101)
    losses = npo_loss(u, beta=0.1)
    assert (losses >= 0).all() and losses[0].item() < 1e-6  # -> 0 as u -> -inf


def test_equals_dpo_with_no_chosen_side():
    # chosen log-ratio 0 (policy = reference on the chosen side): DPO's h = -u, and NPO = (2/beta) * DPO
    u, zero = t(-3.0, 0.0, 2.5), t(0.0, 0.0, 0.0)
    dpo, _, _ = dpo_loss(zero, u, zero, zero, beta=0.1)
    assert npo_loss(u, beta=0.1).tolist() == pytest.approx((2 / 0.1 * dpo).tolist(), abs=1e-5)


def test_forget_and_retain_are_disjoint_families():
    data = ReasoningUnlearn(forget_terms=[4], num_train=300, num_validation=60, num_test=20, max_terms=4)
    forget, retain = data.forget_split("validation"), data.retain_split("validation")
    assert forget and retain and all(ex["num_terms"] == 4 for ex in forget)
    assert all(ex["num_terms"] in (2, 3) for ex in retain)
    assert all(ex["prompt"].count(" ") == 7 for ex in forget)  # "a + b - c + d =\n": 4 terms, 3 operators
    paired = data.split("train")
    assert all(ex["retain"]["num_terms"] != 4 and ex["prompt"] == ex["forget"]["prompt"] for ex in paired)
