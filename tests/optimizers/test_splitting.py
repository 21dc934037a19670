"""FRUGAL / GaLore / Fira (rlx/optimizers/splitting.py) against their definitions and limiting cases."""
import pytest
import torch

from rlx.layers import split_named
from rlx.optimizers.projectors import Coordinates, Full, Subspace, block_selection, subspace_size
from rlx.optimizers.splitting import GradientSplitting
from tests.support import assert_same_params, grads, small_model, splitting


def run(model, optimizer, steps):
    for s in range(steps):
        grads(model, s)
        optimizer.step()






# ---------------------------------------------------------------------------- which parameters are projected


def test_split_rule_projects_attention_and_mlp_matrices_only():
    model = small_model()
    projectable, regular = split_named(list(model.named_parameters()))
    proj = {n.split(".")[-2] for n, _ in projectable}
    assert proj == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(projectable) == 2 * 7
    assert all("norm" in n or "embed" in n for n, _ in regular)  # tied LM head = the embedding
    assert len(projectable) + len(regular) == len(list(model.parameters()))


def test_unnamed_parameters_are_refused():
    with pytest.raises(ValueError, match="named parameters"):
        GradientSplitting(small_model().parameters())


# ---------------------------------------------------------------------------- projectors


@pytest.mark.parametrize("kind", ["svd", "random", "randperm", "rows", "columns", "randk"])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_projection_plus_residual_reconstructs_the_gradient(kind, shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    size = subspace_size(g.shape, kind, 0.25)
    gen = torch.Generator().manual_seed(1)
    if kind in ("svd", "random"):
        proj = Subspace(Subspace.build(g, kind, size, gen), right=shape[0] >= shape[1])
    else:
        proj = Coordinates(Coordinates.build(g.shape, kind, size, gen, g.device), Coordinates.axis_of(kind, g.shape))
    r = proj.down(g)
    torch.testing.assert_close(proj.up(r, g) + proj.residual(g), g, atol=1e-6, rtol=0)
    assert proj.down(proj.residual(g)).abs().max() < 1e-5  # the residual has no component in the subspace
    assert r.numel() == {"svd": 8 * 64, "random": 8 * 64, "randperm": 8 * 64, "randk": 512,
                         "rows": shape[0] // 4 * shape[1], "columns": shape[1] // 4 * shape[0]}[kind]


def test_svd_subspace_keeps_the_top_singular_directions():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    assert subspace_size(g.shape, "svd", 0.25) == 8
    proj = Subspace(Subspace.build(g, "svd", 8, None), right=True)
    s = torch.linalg.svdvals(g)
    # what the projection keeps is exactly the energy of the top 8 singular values
    torch.testing.assert_close(proj.down(g).norm() ** 2, (s[:8] ** 2).sum(), rtol=1e-5, atol=0)


def test_block_selection_orders():
    assert block_selection(8, 0.25, 0, "ascending", None) == [0, 1]
    assert block_selection(8, 0.25, 1, "ascending", None) == [2, 3]
    assert block_selection(8, 0.25, 4, "ascending", None) == [0, 1]  # wraps around
    assert block_selection(8, 0.25, 0, "descending", None) == [6, 7]
    picked = block_selection(8, 0.5, 3, "random", torch.Generator().manual_seed(0))
    assert len(set(picked)) == 4 and all(0 <= i < 8 for i in picked)
    assert block_selection(8, 0.0, 0, "random", None) == []


# ---------------------------------------------------------------------------- limiting cases


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_block_density_one_equals_adamw_step_for_step(weight_decay):
    ours, ref = small_model(), small_model()
    opt = splitting(ours, projector="block", density=1.0, update_gap=3, reset_on_refresh=False,
                    weight_decay=weight_decay)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=weight_decay)
    for s in range(7):
        grads(ours, s), grads(ref, s)
        opt.step(), adamw.step()
        assert_same_params(ours, ref, rtol=1e-6, atol=1e-7)


def test_density_zero_signsgd_moves_projectable_weights_by_lr_times_sign():
    model = small_model()
    opt = splitting(model, projector="block", density=0.0)
    projectable, _ = split_named(list(model.named_parameters()))
    before = {n: p.detach().clone() for n, p in projectable}
    grads(model, 0)
    signs = {n: p.grad.sign() for n, p in projectable}
    opt.step()
    for n, p in projectable:
        torch.testing.assert_close(p.detach(), before[n] - 1e-2 * signs[n], rtol=0, atol=1e-7)
    assert all(not opt.state[p] for _, p in projectable)  # and they hold no optimizer state


@pytest.mark.parametrize("projector", ["svd", "randk", "rows"])
def test_subspace_moments_reset_on_refresh_when_asked(projector):
    model = small_model()
    opt = splitting(model, projector=projector, density=0.5, update_gap=2, reset_on_refresh=True)
    _, p = next((n, p) for n, p in model.named_parameters() if "q_proj" in n)
    for s in range(6):
        grads(model, s)
        opt.step()
        state = opt.state[p]
        assert state["step"] == (1 if s % 2 == 0 else 2)  # a fresh Adam right after each refresh (steps 0, 2, 4)
        if s % 2 == 0:
            proj = opt._projector(p, state, refresh=False, key=None)
            torch.testing.assert_close(state["exp_avg"], 0.1 * proj.down(p.grad))  # (1 - beta1) R: no old momentum


def test_moments_carry_over_without_reset():
    model = small_model()
    opt = splitting(model, projector="svd", density=0.5, update_gap=2, reset_on_refresh=False)
    run(model, opt, 5)
    assert all(opt.state[p]["step"] == 5 for g in opt.param_groups for p in g["params"])


def test_state_free_rules_act_on_the_rows_outside_the_subspace():
    expected = {"none": lambda g: 0 * g, "sgd": lambda g: -1e-2 * g, "signsgd": lambda g: -1e-2 * g.sign()}
    for rule, update in expected.items():
        model = small_model()
        opt = splitting(model, projector="rows", density=0.5, state_free=rule)
        w = model.model.layers[0].self_attn.q_proj.weight
        before = w.detach().clone()
        run(model, opt, 1)  # the gradient stays in w.grad
        rest = torch.ones(w.shape[0], dtype=torch.bool)
        rest[opt.state[w]["index"]] = False
        torch.testing.assert_close((w.detach() - before)[rest], update(w.grad[rest]), msg=rule)


def test_lr_scales():
    """The state-full part moves by lr*scale (first Adam step: sign), the state-free part by lr*state_free_lr_scale."""
    model = small_model()
    opt = splitting(model, projector="rows", density=0.5, scale=0.5, state_free_lr_scale=0.1, eps=0.0)
    w = model.model.layers[0].self_attn.q_proj.weight
    before = w.detach().clone()
    run(model, opt, 1)
    step = (w.detach() - before).abs()
    rows = opt.state[w]["index"]
    torch.testing.assert_close(step[rows], torch.full_like(step[rows], 0.5e-2))
    rest = torch.ones(w.shape[0], dtype=torch.bool)
    rest[rows] = False
    torch.testing.assert_close(step[rest], torch.full_like(step[rest], 1e-3))


def test_full_projector_has_no_residual():
    g = torch.randn(4, 3)
    assert Full().residual(g).abs().max() == 0 and Full().down(g) is g


@pytest.mark.parametrize("projector", ["random", "rows"])
def test_same_shaped_matrices_in_different_groups_draw_different_random_subspaces(projector):
    a, b = (torch.nn.Parameter(torch.zeros(32, 16)) for _ in range(2))
    opt = GradientSplitting([{"params": [("mlp.a", a)]}, {"params": [("mlp.b", b)], "lr": 1e-3}],
                            projector=projector, density=0.25)
    a.grad, b.grad = torch.randn(32, 16), torch.randn(32, 16)
    opt.step()
    key = "basis" if projector == "random" else "index"
    assert not torch.equal(opt.state[a][key], opt.state[b][key])
