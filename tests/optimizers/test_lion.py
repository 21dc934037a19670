"""Lion (bitsandbytes) and Lion-K: the scalar checks by hand for both, the constraint the weight
decay imposes, Lion-K's l1 kernel against bitsandbytes step for step, the nuclear kernel's
spectrum, state round-trips, and runs through the loop."""
from __future__ import annotations

import copy
import io

import bitsandbytes as bnb
import pytest
import torch

from rlx.optimizers.lion_k import KERNELS, LionK, dual_norm, l2_grad, nuclear_grad
from rlx.tasks import run_training
from tests.support import small_config, straight_and_resumed

LIONS = {
    "bnb": lambda params, **kw: bnb.optim.Lion(params, **kw),
    "lion_k": lambda params, **kw: LionK(params, kernel="l1", **kw),
}


def momentum(opt, p) -> torch.Tensor:
    """The momentum buffer, in Lion's sign (an EMA of +g) for both implementations."""
    state = opt.state[p]
    return state["exp_avg"] if "exp_avg" in state else state["state1"]


def run_constant_grad(make, x0: float, g: float, steps: int, lr: float, wd: float) -> float:
    p = torch.nn.Parameter(torch.tensor([x0]))
    opt = make([p], lr=lr, weight_decay=wd)
    for _ in range(steps):
        p.grad = torch.tensor([g])
        opt.step()
    return p.item()


# ---------------------------------------------------------------------------- by hand


@pytest.mark.parametrize("name", LIONS)
def test_one_step_by_hand(name):
    # c = 0.9·0 + 0.1·0.5 = 0.05 → sign 1; θ = 1 − 0.1·(1 + 0.01·1) = 0.899; m = 0.99·0 + 0.01·0.5 = 0.005
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LIONS[name]([p], lr=0.1, weight_decay=0.01, betas=(0.9, 0.99))
    p.grad = torch.tensor([0.5])
    opt.step()
    assert p.item() == pytest.approx(0.899, abs=1e-7)
    assert momentum(opt, p).item() == pytest.approx(0.005, abs=1e-9)


@pytest.mark.parametrize("name", LIONS)
def test_weight_decay_bounds_the_weights_at_one_over_lambda(name):
    # f(x) = −x pushes x up forever; x_t = (1 − ηλ)x + η → 1/λ = 10: 10(1 − 0.999^5000) = 9.933
    x = run_constant_grad(LIONS[name], x0=0.0, g=-1.0, steps=5000, lr=0.01, wd=0.1)
    assert x == pytest.approx(9.933, abs=1e-3)
    assert x == pytest.approx(10 * (1 - 0.999**5000), abs=1e-3)  # float32 accumulation over 5000 steps


@pytest.mark.parametrize("name", LIONS)
def test_zero_gradient_only_decays(name):
    # m stays 0, sign(0) = 0: each step multiplies x by (1 − ηλ) = 0.999
    assert run_constant_grad(LIONS[name], x0=1.0, g=0.0, steps=10, lr=0.1, wd=0.01) == pytest.approx(0.999**10, rel=1e-6)


# ---------------------------------------------------------------------------- Lion-K = Lion


def least_squares(seed: int = 0):
    """A 6×5 linear map with bias fitted to a random target: the same problem for every optimizer."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 5, generator=gen), torch.randn(32, 6, generator=gen)
    model = torch.nn.Linear(5, 6)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model, lambda m: ((m(x) - y) ** 2).mean()


def test_l1_kernel_equals_bitsandbytes_lion_step_for_step():
    model, loss_fn = least_squares()
    twin = copy.deepcopy(model)
    ours = LionK(twin.parameters(), lr=5e-2, weight_decay=0.1, kernel="l1")
    ref = bnb.optim.Lion(model.parameters(), lr=5e-2, weight_decay=0.1)
    start = loss_fn(model).item()
    for _ in range(25):
        for m, opt in ((model, ref), (twin, ours)):
            opt.zero_grad()
            loss_fn(m).backward()
            opt.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert loss_fn(twin).item() < 0.5 * start  # and it trained


# ---------------------------------------------------------------------------- other kernels


def test_nuclear_step_has_every_singular_value_equal_to_lr():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = LionK([w], lr=0.05, kernel="nuclear")
    for _ in range(3):  # the first step from m = 0, then with momentum
        before = w.detach().clone()
        w.grad = torch.randn(6, 4)
        opt.step()
        torch.testing.assert_close(torch.linalg.svdvals(w.detach() - before), torch.full((4,), 0.05))


def test_nuclear_kernel_on_other_shapes_and_rank_deficient_matrices():
    v = torch.tensor([3.0, -4.0])
    torch.testing.assert_close(nuclear_grad(v), torch.tensor([0.6, -0.8]))  # a 1×2 matrix: x/‖x‖
    conv = torch.randn(4, 2, 3, 3)
    assert torch.linalg.svdvals(nuclear_grad(conv).reshape(4, -1)).sub(1).abs().max() < 1e-5
    rank1 = torch.outer(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([3.0, 4.0]))  # u = (1,2,2)/3, v = (3,4)/5
    torch.testing.assert_close(nuclear_grad(rank1), torch.outer(torch.tensor([1.0, 2.0, 2.0]) / 3, torch.tensor([0.6, 0.8])))
    assert nuclear_grad(torch.zeros(3, 2)).abs().max() == 0  # zero momentum, zero step


def test_l2_kernel_normalizes_the_whole_tensor():
    torch.testing.assert_close(l2_grad(torch.tensor([[3.0], [4.0]])), torch.tensor([[0.6], [0.8]]))
    assert l2_grad(torch.zeros(3)).abs().max() == 0


def test_quadratic_kernel_is_nesterov_momentum_sgd():
    # ∇K = identity: x_1 = x_0 − η (1−β1) g on the first step (m = 0): 1 − 0.1·0.1·2 = 0.98
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LionK([p], lr=0.1, kernel="quadratic")
    p.grad = torch.tensor([2.0])
    opt.step()
    assert p.item() == pytest.approx(0.98, abs=1e-7)


def test_nuclear_weight_decay_bounds_the_spectral_norm():
    # a constant gradient: x_t = (1 − ηλ) x + η U Vᵀ → U Vᵀ/λ, whose spectral norm is 1/λ = 2
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(6, 4))
    g = torch.randn(6, 4)
    opt = LionK([w], lr=0.05, weight_decay=0.5, kernel="nuclear")
    for _ in range(600):
        w.grad = g
        opt.step()
    assert 0.5 * dual_norm(w.detach(), "nuclear") == pytest.approx(1.0, abs=1e-4)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="valid: l1, l2, nuclear, quadratic"):
        LionK([torch.nn.Parameter(torch.zeros(2))], kernel="l3")


# ---------------------------------------------------------------------------- state


@pytest.mark.parametrize("kernel", KERNELS)
def test_state_dict_round_trips(kernel):
    model, loss_fn = least_squares()
    opt = LionK([{"params": list(model.named_parameters())}], lr=1e-2, weight_decay=0.1, kernel=kernel)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = copy.deepcopy(model)
    restored = LionK([{"params": list(twin.named_parameters())}], lr=1e-2, weight_decay=0.1, kernel=kernel)
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert restored.param_groups[0]["param_names"] == ["weight", "bias"]
    for m, o in ((model, opt), (twin, restored)):
        for _ in range(2):
            o.zero_grad()
            loss_fn(m).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


# ---------------------------------------------------------------------------- through the loop

LOOP = ["algo=sft", "optimizer=lion_k", "optimizer.kernel=nuclear", "optimizer.lr=1e-2", "optimizer.weight_decay=0.1"]


def test_lion_k_trains_in_the_loop(tmp_path):
    summary = run_training(small_config(*LOOP), tmp_path)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["train/loss"]))


def test_lion_k_resumes_exactly(tmp_path):
    # a constant LR: the cut run's schedule would otherwise end at its own (shorter) max_steps
    full, resumed, a, b = straight_and_resumed(tmp_path, [*LOOP, "trainer.lr_scheduler=constant"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["train/loss"] == resumed["train/loss"]
