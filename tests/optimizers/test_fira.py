"""Fira's residual rules by hand, its limiting cases, and GaLore/Fira against their reference packages."""
import math
import warnings

import pytest
import torch

from rlx.errors import RlxError
from rlx.optimizers.fira import limit_growth, norm_scaling
from rlx.optimizers.splitting import GradientSplitting
from tests.support import assert_same_params, grads, small_model, splitting


def test_limiter_caps_norm_growth_at_gamma():
    applied, previous = [], None
    for norm in (1.0, 2.0, 2.0):
        s, previous = limit_growth(torch.tensor([norm, 0.0]), previous, 1.01)
        applied.append(s.norm().item())
    assert applied == pytest.approx([1.0, 1.01, 1.0201])
    s, kept = limit_growth(torch.tensor([0.5]), 1.0, 1.01)  # shrinking is never limited
    assert s.item() == 0.5 and kept == 0.5


def test_norm_scaling_per_shared_column_and_row():
    r = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    psi = torch.ones(2, 2)
    # axis 0 compressed: one factor per column, ||psi col|| / ||R col|| = sqrt(2)/5, sqrt(2)/1
    torch.testing.assert_close(norm_scaling(psi, r, 0), torch.tensor([[math.sqrt(2) / 5, math.sqrt(2)]]))
    # axis 1 compressed: one factor per row, sqrt(2)/3, sqrt(2)/sqrt(17)
    torch.testing.assert_close(norm_scaling(psi, r, 1), torch.tensor([[math.sqrt(2) / 3], [math.sqrt(2 / 17)]]))
    torch.testing.assert_close(norm_scaling(psi, r, None), torch.tensor(2 / math.sqrt(26)))


def test_first_fira_step_by_hand():
    """Rows projector: Adam's first step is sign(R) (eps 0), so each kept column j of the residual rows
    moves by lr * (sqrt(k) / ||R_:,j||) * G_ij, k being the number of state-full rows."""
    model = small_model()
    opt = splitting(model, projector="rows", density=0.5, state_free="fira", scale=1.0, eps=0.0)
    w = model.model.layers[1].mlp.down_proj.weight
    before = w.detach().clone()
    grads(model, 0)
    opt.step()
    rows = opt.state[w]["index"]
    rest = torch.ones(w.shape[0], dtype=torch.bool)
    rest[rows] = False
    phi = math.sqrt(len(rows)) / w.grad[rows].norm(dim=0)
    torch.testing.assert_close((w.detach() - before)[rest], -1e-2 * phi * w.grad[rest])
    torch.testing.assert_close((w.detach() - before)[rows], -1e-2 * w.grad[rows].sign())


def test_fira_refuses_an_empty_subspace():
    with pytest.raises(ValueError, match="subspace"):
        splitting(small_model(), projector="svd", density=0.0, state_free="fira")
    with pytest.raises(ValueError, match="subspace"):
        splitting(small_model(), projector="block", state_free="fira")


def test_fira_at_full_density_with_a_permutation_projector_equals_adamw():
    ours, ref = small_model(), small_model()
    opt = splitting(ours, projector="randperm", density=1.0, state_free="fira", update_gap=3, reset_on_refresh=False)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for s in range(6):  # refreshes permute the coordinates; Adam is permutation-equivariant
        grads(ours, s), grads(ref, s)
        opt.step(), adamw.step()
    assert_same_params(ours, ref, rtol=1e-5, atol=1e-6)


def test_fira_at_full_rank_equals_galore():
    """A full-rank orthonormal basis leaves no residual, so Fira's extra term vanishes."""
    fira, galore = small_model(), small_model()
    opts = [splitting(m, projector="svd", density=1.0, state_free=rule, update_gap=2, reset_on_refresh=False)
            for m, rule in ((fira, "fira"), (galore, "none"))]
    for s in range(5):
        for m, opt in zip((fira, galore), opts):
            grads(m, s)
            opt.step()
    assert_same_params(fira, galore, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- the reference packages

def one_matrix(seed=0):
    return torch.nn.Parameter(torch.randn(64, 32, generator=torch.Generator().manual_seed(seed)))


def steps_with(optimizer, w, n=7):
    for s in range(n):
        w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(100 + s))
        optimizer.step()
    return w.detach()


@pytest.mark.parametrize("package, cls, scale_key, rule, scale, residual", [
    ("galore_torch", "GaLoreAdamW", "scale", "none", 0.25, "paper"),  # GaLore, its update scaled by 0.25
    # the fira package forms the residual as G - alpha*P*R; at alpha = 1 that is the paper's G - P*R
    ("fira", "FiraAdamW", "alpha", "fira", 1.0, "paper"),
    ("fira", "FiraAdamW", "alpha", "fira", 0.25, "code"),  # the paper's alpha, with the code's residual
])
def test_matches_the_reference_package(package, cls, scale_key, rule, scale, residual):
    peer_cls = getattr(pytest.importorskip(package), cls)
    ours, ref = one_matrix(), one_matrix()
    opt = GradientSplitting([("mlp.w", ours)], lr=1e-2, betas=(0.9, 0.999), eps=1e-10, projector="svd", rank=8,
                            update_gap=3, state_free=rule, scale=scale, reset_on_refresh=False,
                            fira_residual=residual)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peer = peer_cls([{"params": [ref], "rank": 8, "update_proj_gap": 3, scale_key: scale, "proj_type": "std"}],
                        lr=1e-2, eps=1e-10)
    torch.testing.assert_close(steps_with(opt, ours), steps_with(peer, ref), rtol=1e-5, atol=1e-6)


def test_memory_report_sees_the_basis_galore_torch_keeps_in_its_projector():
    """The peer keeps its basis inside a projector object, as a slice of the SVD's Vh: the report must see
    it, and counts the storage that slice keeps alive (all of Vh, 32x32, not 8x32)."""
    galore_torch = pytest.importorskip("galore_torch")
    from rlx.memory import memory_report

    ours, ref = one_matrix(), one_matrix()
    opt = GradientSplitting([("mlp.w", ours)], projector="svd", rank=8, state_free="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peer = galore_torch.GaLoreAdamW([{"params": [ref], "rank": 8, "update_proj_gap": 3, "scale": 0.25,
                                          "proj_type": "std"}])
    steps_with(opt, ours, 1), steps_with(peer, ref, 1)
    moments = 2 * 64 * 8  # two moments of R (64x8)
    assert memory_report(torch.nn.Linear(1, 1), opt)["optimizer_MB"] == pytest.approx((moments + 8 * 32) * 4 / 2**20)
    assert memory_report(torch.nn.Linear(1, 1), peer)["optimizer_MB"] == pytest.approx((moments + 32 * 32) * 4 / 2**20)


@pytest.mark.parametrize("options", [{"projector": "svd", "rank": 0}, {"projector": "rows", "density": 0.01}])
def test_fira_refuses_a_matrix_with_no_subspace_at_construction(options):
    """rank 0 (or a density that rounds to no row) leaves no Adam step to scale the residual by."""
    with pytest.raises(RlxError, match="state_free=fira needs"):
        splitting(small_model(), state_free="fira", **options)


def test_the_paper_residual_differs_from_the_code_residual_below_alpha_one():
    """At alpha 0.25 the code's residual G - alpha*P*R keeps 75% of the in-subspace gradient; the paper's has none."""
    paper, code = one_matrix(), one_matrix()
    opts = [GradientSplitting([("mlp.w", w)], projector="svd", rank=8, state_free="fira", scale=0.25,
                              fira_residual=form) for w, form in ((paper, "paper"), (code, "code"))]
    assert not torch.allclose(steps_with(opts[0], paper, 1), steps_with(opts[1], code, 1))


def test_fira_residual_is_checked():
    with pytest.raises(RlxError, match="fira_residual"):
        GradientSplitting([("mlp.w", one_matrix())], projector="svd", rank=8, state_free="fira", fira_residual="codes")
