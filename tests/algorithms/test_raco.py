"""RACO (rlx/algorithms/raco.py): the paper note's 2-D toys, the exact solvers against a dense grid,
the DPO-LW and DPO limits, and the conflicting pairs its data option makes."""
import pytest
import torch

from rlx.algorithms.dpo import DPO
from rlx.algorithms.raco import RACO, pair_signs, raco_coefficients, solve_simplex
from rlx.config import build
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.state import TrainState
from tests.support import small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def direction(g: torch.Tensor, w, c, clip=True, use_cagrad=True) -> torch.Tensor:
    """G0 for objective gradients g [m, d]."""
    a = raco_coefficients(g.double() @ g.double().T, torch.tensor(w, dtype=torch.float64), c, clip, use_cagrad)
    return a @ g.double()


def test_the_notes_toy_keeps_the_users_tilt():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    H, w = g.double() @ g.double().T, torch.tensor([0.8, 0.2], dtype=torch.float64)
    s = 0.8 * float((w @ H @ w).sqrt())
    assert s == pytest.approx(0.659697, abs=1e-6)
    assert solve_simplex(H, H @ w, s)[0].item() == pytest.approx(0.080081, abs=1e-6)
    assert direction(g, [0.8, 0.2], 0.8).tolist() == pytest.approx([1.045218, 0.812428], abs=2e-6)
    assert direction(g, [0.8, 0.2], 0.8, clip=False).tolist() == pytest.approx([0.857211, 0.857211], abs=2e-6)


def test_conflicting_gradients_both_improve():
    """g1 = (1, 0), g2 = (-0.5, 1), w = (0.8, 0.2), c = 0.4: lambda* = 0, G0 = (0.569769, 0.460461), and
    both objectives descend along G0, where DPO-LW's g0 = (0.7, 0.2) raises objective 2."""
    g = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])
    G0 = direction(g, [0.8, 0.2], 0.4)
    assert G0.tolist() == pytest.approx([0.569769, 0.460461], abs=2e-6)
    assert (g.double() @ G0 > 0).all()
    g0 = direction(g, [0.8, 0.2], 0.4, use_cagrad=False)
    assert g0.tolist() == pytest.approx([0.7, 0.2]) and (g.double() @ g0)[1] < 0


def test_no_radius_is_dpo_lw_and_identical_objectives_scale_by_one_plus_c():
    g = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 3.0]])
    assert direction(g, [0.3, 0.7], 0.0).tolist() == pytest.approx((0.3 * g[0] + 0.7 * g[1]).tolist())
    same = torch.tensor([[1.0, 2.0, -1.0]] * 3)
    assert direction(same, [0.2, 0.3, 0.5], 0.4).tolist() == pytest.approx([1.4, 2.8, -1.4], abs=1e-9)


def _grid_minimum(H, b, s, m, steps):
    """min of Phi over a dense grid of the simplex."""
    points = [(i / steps, 1 - i / steps) for i in range(steps + 1)] if m == 2 else \
        [(i / steps, j / steps, 1 - (i + j) / steps) for i in range(steps + 1) for j in range(steps + 1 - i)]
    p = torch.tensor(points, dtype=torch.float64)
    return float((p @ b + s * ((p @ H) * p).sum(1).clamp(min=0).sqrt()).min())


@pytest.mark.parametrize("m, seed", [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (3, 3)])
def test_exact_solvers_match_a_dense_grid(m, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, 5, generator=gen, dtype=torch.float64)
    if seed == 3:
        g[2] = g[0] + g[1]  # a singular Gram matrix
    H = g @ g.T
    w = torch.rand(m, generator=gen, dtype=torch.float64)
    w /= w.sum()
    s = 0.6 * float((w @ H @ w).sqrt())
    p = solve_simplex(H, H @ w, s)
    phi = float(H @ w @ p + s * (p @ H @ p).sqrt())
    assert abs(float(p.sum()) - 1) < 1e-9 and (p >= -1e-9).all()
    assert phi <= _grid_minimum(H, H @ w, s, m, steps=2000 if m == 2 else 300) + 1e-9


def test_the_conflicting_pairs_and_their_signs():
    data = build(small_config("algo=raco").data)
    pairs = data.split("train")
    kinds = {p["kind"] for p in pairs}
    assert kinds == {"wrong", "long", "careful"}
    signs = pair_signs(pairs, ["correct", "short"], data)
    by_kind = {k: signs[:, [i for i, p in enumerate(pairs) if p["kind"] == k]] for k in kinds}
    assert (by_kind["careful"][0] == 1).all() and (by_kind["careful"][1] == -1).all()  # the conflict
    assert (by_kind["long"][0] == 0).all() and (by_kind["long"][1] == 1).all()  # both right: brevity decides
    assert (by_kind["wrong"][0] == 1).all() and (by_kind["wrong"][1] == 0).all()  # same length: correctness decides


def _state_and_batch(algo, examples):
    policy = tiny(**SMALL, device="cpu")
    data = build(small_config("algo=raco").data)
    state = TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.1), None, data)
    return state, algo.make_batch(examples, state)


def _grads(algo, examples):
    state, batch = _state_and_batch(algo, examples)
    loss, metrics = algo.loss(batch, state)
    loss.backward()
    return [p.grad.clone() for p in state.model.parameters()], metrics


def test_one_objective_is_dpo_scaled_by_one_plus_c():
    reference = tiny(**SMALL, device="cpu", seed=3)
    pairs = build(small_config("algo=raco").data).split("train")[:6]
    raco, _ = _grads(RACO(reference, objectives=["label"], weights=[1.0], c=0.4), pairs)
    dpo, _ = _grads(DPO(reference, beta=0.2), pairs)
    for r, d in zip(raco, dpo):
        torch.testing.assert_close(r, 1.4 * d, rtol=1e-4, atol=1e-6)


def test_two_objectives_on_the_model_follow_the_coefficients():
    """The loop's gradient is sum_i a_i g_i with the logged a_i; DPO-LW's a is w."""
    reference = tiny(**SMALL, device="cpu", seed=3)
    pairs = build(small_config("algo=raco").data).split("train")[:8]
    _, metrics = _grads(RACO(reference, c=0.4), pairs)
    lw, lw_metrics = _grads(RACO(reference, use_cagrad=False), pairs)
    assert (lw_metrics["raco/a_correct"], lw_metrics["raco/a_short"]) == pytest.approx((0.8, 0.2))
    assert metrics["raco/a_correct"] + metrics["raco/a_short"] > 1.0  # the CAGrad correction adds a step
    assert -1.0 <= metrics["raco/cos"] <= 1.0


def test_settings_are_checked():
    with pytest.raises(RlxError, match="one weight per objective"):
        RACO(tiny(**SMALL, device="cpu"), objectives=["correct", "short"], weights=[1.0])
    with pytest.raises(RlxError, match="unknown RACO objectives"):
        RACO(tiny(**SMALL, device="cpu"), objectives=["speed"], weights=[1.0])
    with pytest.raises(RlxError, match="not for ties"):
        build(small_config("algo=raco", "data.ties=0.2").data)


def test_runs_in_the_loop(tmp_path):
    from rlx.tasks import run_training

    summary = run_training(small_config("algo=raco", "trainer.max_steps=2"), tmp_path)
    assert "raco/a_correct" in summary and "raco/cos" in summary
