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


# ---------------------------------------------------------------------------- through a model

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
DATA = ReasoningUnlearn(num_train=200, num_validation=20, num_test=20)


def setup(**kwargs):
    from rlx.algorithms.npo import NPO
    from rlx.models import tiny
    from rlx.state import TrainState

    policy, reference = tiny(**SMALL, device="cpu"), tiny(**SMALL, device="cpu")  # same seed: same weights
    state = TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.5), None, DATA)
    return NPO(reference, **kwargs), state


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def summed_logps(model, rows, tokenizer) -> torch.Tensor:
    """The summed answer log-probs through rlx's pair code (not NPO's own gather)."""
    from rlx.algorithms._pairs import response_logps
    from rlx.data.collate import lm_batch

    return response_logps(model, lm_batch(rows, tokenizer, 256))


def test_first_step_gradient_is_gradient_ascent_on_the_summed_nll():
    # At pi = pi_ref, u = 0 and NPO's weight 2 sigma(0) = 1: its gradient is GA's, the mean over forget
    # examples of grad log pi(y|x), the summed log-likelihood (here computed by another code path).
    algo, state = setup(retain="none")
    examples = DATA.split("train")[:4]
    loss, metrics = algo.loss(algo.make_batch(examples, state), state)
    assert loss.item() == pytest.approx(20 * math.log(2), abs=1e-4) and metrics["npo/weight"] == pytest.approx(1.0)
    loss.backward()
    npo = grads(state.model)
    state.model.zero_grad()
    summed_logps(state.model, [ex["forget"] for ex in examples], state.tokenizer)[0].mean().backward()
    for a, b in zip(npo, grads(state.model)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_retain_terms_by_another_path():
    examples = DATA.split("train")[:4]
    retain = [ex["retain"] for ex in examples]
    algo, state = setup(retain="nll", forget_coef=0.0)
    nll, _ = algo.loss(algo.make_batch(examples, state), state)
    logps, counts = summed_logps(state.model, retain, state.tokenizer)
    assert nll.item() == pytest.approx((-logps / counts).mean().item(), abs=1e-5)  # per-example token-mean NLL
    algo, state = setup(retain="kl", forget_coef=0.0)
    kl, _ = algo.loss(algo.make_batch(examples, state), state)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)  # pi = pi_ref: no divergence yet


def test_npo_raises_the_forget_nll_and_its_weight_falls():
    algo, state = setup(retain="none")
    batch = algo.make_batch(DATA.split("train")[:4], state)
    for _ in range(5):
        state.optimizer.zero_grad()
        loss, metrics = algo.loss(batch, state)
        loss.backward()
        state.optimizer.step()
    _, metrics = algo.loss(batch, state)
    assert metrics["npo/log_ratio"] < 0 and metrics["npo/weight"] < 1.0  # forgetting slows itself down


def test_bad_settings_and_data_are_one_line_errors():
    from rlx.algorithms.npo import NPO
    from rlx.errors import RlxError
    from rlx.models import tiny

    reference = tiny(**SMALL, device="cpu")
    for kwargs in ({"loss": "dpo"}, {"retain": "all"}, {"beta": 0.0}, {"retain_coef": -1.0}):
        with pytest.raises(RlxError):
            NPO(reference, **kwargs)
    with pytest.raises(RlxError, match="reasoning_unlearn"):
        algo, state = setup()
        algo.make_batch([{"prompt": "1 + 2 =\n", "completion": "#### 3"}], state)


@pytest.mark.parametrize("variant", [[], ["algo.loss=ga", "algo.retain=kl"]])
def test_runs_in_the_loop(variant, tmp_path):
    from rlx.tasks import run_training
    from tests.support import small_config

    summary = run_training(small_config("algo=npo", "data=reasoning_unlearn", *variant), tmp_path)
    assert summary["steps"] == 2 and math.isfinite(summary["train/loss"])
