"""IGNITE's gradient-norm regularizer (rlx/regularizers.py) against hand-worked values: the paper
note's quadratic, a cubic that tells the forward, backward and SAM forms apart, exact double
backprop, the dual ascent of λ by hand, and loop runs (λ = 0 is plain training, exact resume)."""
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rlx.algorithms.dpo import DPO
from rlx.errors import RlxError
from rlx.regularizers import GradNorm, finite_difference_gradients
from rlx.tasks import run_training
from tests.support import losses, small_config, straight_and_resumed

A = torch.tensor([1.0, 10.0])  # L = ½ θᵀ diag(1, 10) θ


class Quadratic:
    """An 'algorithm' whose loss is ½ θᵀAθ on one parameter vector (A diagonal)."""

    needs_trained_model = False

    def __init__(self, theta, a=A):
        self.theta, self.a = theta, a

    def loss(self, batch, state):
        loss = 0.5 * (self.a * self.theta**2).sum()
        return loss, {"train/loss": loss.detach()}

    def make_batch(self, examples, state):
        return {"num_targets": 1}

    def param_groups(self):
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state): ...


def setup(theta=(1.0, 1.0), lr=0.05, a=A, **kw):
    p = torch.nn.Parameter(torch.tensor(theta))
    state = SimpleNamespace(step=0, optimizer=torch.optim.SGD([p], lr=lr))
    return p, state, GradNorm(Quadratic(p, a), **kw)


def test_forward_difference_of_a_quadratic_is_a_squared_theta():
    # The note's check: [∇L(θ + ε∇L) − ∇L(θ)]/ε = A²θ = (1, 100) at θ = (1, 1), ε = 1e-3. The probe
    # steps r·ĝ, so r = ε‖g‖ with ‖g‖ = ‖(1, 10)‖ = √101; coef = λρ = 1 leaves d − g = (g' − g)/r
    # = Aĝ, and (d − g)·‖g‖ = A g = A²θ.
    p = torch.nn.Parameter(torch.ones(2))
    algo = Quadratic(p)
    _, _, d, norm, _ = finite_difference_gradients(lambda: algo.loss({}, None), [p], 1.0, 1e-3 * math.sqrt(101))
    assert norm.item() == pytest.approx(math.sqrt(101), rel=1e-6)
    torch.testing.assert_close((d[0] - A) * norm, torch.tensor([1.0, 100.0]), rtol=1e-4, atol=0)
    assert p.tolist() == [1.0, 1.0]  # restored exactly


def test_combined_gradient_and_value_by_hand():
    # θ = (1, 1): L = ½(1 + 10) = 5.5, g = (1, 10), ĝ = (1, 10)/√101 = (0.0995037, 0.9950372).
    # For a quadratic g' − g = A(r ĝ), so d = g + λρ Aĝ; λ = 0.5, ρ = 0.1 (r = 0.2 drops out):
    #   d = (1 + 0.05·0.0995037, 10 + 0.05·9.950372) = (1.0049752, 10.4975186)
    p, state, reg = setup(lam=0.5, rho=0.1, r=0.2, eta=0.0)
    loss, metrics = reg.loss({"num_targets": 1}, state)
    assert loss.item() == 5.5 and metrics["train/loss"].item() == 5.5
    loss.backward()
    torch.testing.assert_close(p.grad, torch.tensor([1.0049752, 10.4975186]), rtol=1e-6, atol=0)
    assert metrics["reg/grad_norm"] == pytest.approx(math.sqrt(101), rel=1e-6)
    assert metrics["reg/penalty"] == pytest.approx(0.5 * 0.1 * math.sqrt(101), rel=1e-6)  # λρ‖g‖
    # ‖d − g‖/‖g‖ = 0.05‖Aĝ‖/‖g‖ = 0.05·√(1 + 10⁴)/101 = 0.0495074
    assert metrics["reg/correction_ratio"] == pytest.approx(0.05 * math.sqrt(10001) / 101, rel=1e-5)


@pytest.mark.parametrize("of,lam,expected", [
    # 1-D L = θ³/3 at θ = 1: g = θ² = 1, ĝ = 1, H = 2θ = 2; ρ = r = 0.1, so coef/r = λ.
    ("loss", 0.5, 1 + 0.5 * ((1.1**2) - 1)),        # forward:  g + λ(g(1.1) − g(1)) = 1 + 0.5·0.21 = 1.105
    ("neg_loss", 0.5, 1 + 0.5 * (1 - 0.9**2)),      # backward: g + λ(g(1) − g(0.9)) = 1 + 0.5·0.19 = 1.095
    ("loss", 1.0, 1.1**2),                          # λρ = r: d = g(θ + rĝ), SAM's gradient = 1.21
])
def test_cubic_tells_forward_backward_and_sam_apart(of, lam, expected):
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    algo = Quadratic(p)
    algo.loss = lambda batch, state: ((p**3).sum() / 3, {})
    state = SimpleNamespace(step=0, optimizer=torch.optim.SGD([p], lr=0.1))
    loss, _ = GradNorm(algo, lam=lam, rho=0.1, r=0.1, eta=0.0, of=of).loss({}, state)
    loss.backward()
    assert p.grad.item() == pytest.approx(expected, abs=1e-12)


def test_small_probe_matches_double_backprop_of_the_gradient_norm():
    # A peer: ∇(L + λρ‖∇L‖) by exact double backprop on a small tanh network, in float64.
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    w2 = torch.nn.Parameter(torch.randn(1, 5, dtype=torch.float64))
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)

    def loss_fn():
        return ((torch.tanh(x @ w1.T) @ w2.T - y) ** 2).mean(), {}

    loss, _ = loss_fn()
    g = torch.autograd.grad(loss, [w1, w2], create_graph=True)
    exact = torch.autograd.grad(loss + 0.3 * torch.sqrt(sum((t**2).sum() for t in g)), [w1, w2])
    _, _, d, _, _ = finite_difference_gradients(loss_fn, [w1, w2], 0.3, 1e-5)
    for a, b in zip(d, exact):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_dual_ascent_over_two_steps_by_hand():
    # λ0 = 0 (step 1 is plain), η = 1, ρ = 0.05, ε = 0.1, SGD lr 0.05 from θ = (1, 1):
    #   step 1: g = (1, 10), ‖g‖ = √101 = 10.0498756; θ1 = (1, 1) − 0.05(1, 10) = (0.95, 0.5)
    #   λ1 = 0 + (0.05·10.0498756 − 0.1) = 0.4024938, applied when step 2 starts
    #   step 2: g = Aθ1 = (0.95, 5), ‖g‖ = √25.9025 = 5.0894499
    #   λ2 = 0.4024938 + (0.05·5.0894499 − 0.1) = 0.5569663
    p, state, reg = setup(lam=0.0, rho=0.05, r=0.05, eta=1.0, epsilon=0.1)
    seen = []
    for _ in range(2):
        loss, metrics = reg.loss({"num_targets": 1}, state)
        seen.append(metrics["reg/lambda"])
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.step += 1
    reg._settle(state.step)
    assert seen[0] == 0.0 and seen[1] == pytest.approx(0.4024938, abs=1e-6)
    assert reg.lam == pytest.approx(0.5569663, abs=1e-6)


@pytest.mark.parametrize("project", [True, False])
def test_lambda_is_kept_non_negative_unless_asked(project):
    # θ = (0.01, 0.01): ‖g‖ = 0.01·√101 = 0.1005, ρ‖g‖ = 0.005 < ε = 0.1; λ0 = 0.001, η = 1:
    #   λ1 = 0.001 + (0.0050249 − 0.1) = −0.0939751 -> 0 when projected (the official code keeps it)
    _, state, reg = setup(theta=(0.01, 0.01), lam=0.001, rho=0.05, r=0.05, eta=1.0, epsilon=0.1, project=project)
    reg.loss({"num_targets": 1}, state)
    state.step = 1
    reg._settle(state.step)
    assert reg.lam == (0.0 if project else pytest.approx(-0.0939751, abs=1e-7))


def test_state_dict_holds_lambda_and_the_pending_update():
    _, state, reg = setup(lam=0.2, eta=1.0)
    reg.loss({"num_targets": 1}, state)
    _, _, other = setup(lam=0.7, eta=1.0)
    other.load_state_dict(reg.state_dict())
    state.step = 1
    reg._settle(1), other._settle(1)
    assert other.lam == reg.lam != 0.2


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0.0}, "probe step must be > 0"), ({"r": -0.1}, "probe step must be > 0"),
    ({"lam": -1e-3}, "must be >= 0"), ({"eta": -1.0}, "must be >= 0"), ({"of": "logits"}, "unknown regularizer.of"),
])
def test_bad_values_are_one_line_errors(kwargs, match):
    with pytest.raises(RlxError, match=match) as e:
        GradNorm(Quadratic(torch.nn.Parameter(torch.ones(2))), **kwargs)
    assert "\n" not in str(e.value)


def test_dpo_bco_running_mean_is_refused():
    dpo = DPO.__new__(DPO)
    dpo.bco_running_mean, dpo.needs_trained_model = True, True
    with pytest.raises(RlxError, match="running"):
        GradNorm(dpo)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain SFT run of 2 steps: (its summary, its run folder)."""
    run_dir = tmp_path_factory.mktemp("plain")
    return run_training(small_config("trainer.save_every=2"), run_dir), run_dir


def weights(run_dir):
    return load_file(run_dir / "checkpoints/last/model.safetensors")


def test_lambda_zero_is_plain_training_bit_for_bit(plain, tmp_path):
    summary, plain_dir = plain
    reg = run_training(small_config("trainer.save_every=2", "regularizer=grad_norm_fixed", "regularizer.lam=0"),
                       tmp_path)
    assert losses(plain_dir) == losses(tmp_path) and summary["train/grad_norm"] == reg["train/grad_norm"]
    a, b = weights(plain_dir), weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_with_grad_norm_trains_on_the_tiny_model(plain, tmp_path):
    summary, plain_dir = plain
    reg = run_training(small_config("trainer.save_every=2", "algo=sft", "regularizer=grad_norm", "regularizer.lam=0.5"),
                       tmp_path)
    assert losses(plain_dir)[0] == losses(tmp_path)[0]  # the value is the plain loss
    assert math.isfinite(reg["train/loss"]) and reg["reg/correction_ratio"] > 0
    assert reg["reg/lambda"] != 0.5  # dual ascent moved it
    a, b = weights(plain_dir), weights(tmp_path)
    assert any(not torch.equal(a[k], b[k]) for k in a) and summary["train/loss"] != reg["train/loss"]


def test_resume_is_exact(tmp_path):
    # cut after step 1: that step's dual update is still pending in the checkpoint, applied on resume
    full, resumed, w_full, w_cut = straight_and_resumed(
        tmp_path, ["regularizer=grad_norm", "regularizer.lam=0.5", "regularizer.eta=1", "trainer.lr_scheduler=constant"],
        steps=2, cut=1)
    assert full["reg/lambda"] == resumed["reg/lambda"] != 0.5
    assert full["train/loss"] == resumed["train/loss"]
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)
