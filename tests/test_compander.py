"""The weight compander: its laws by hand, their shape (odd, monotone, compressing above the crossover,
expanding near zero), the identity at μ = 0, the start from the model as built, the merged export,
a loop run and exact resume."""
import math

import pytest
import torch
from torch import nn

from rlx.compander import (
    Compander,
    _MuLaw,
    apply_compander,
    compand,
    companded,
    expand,
    export_plain,
    merge,
    weight_stats,
)
from rlx.errors import RlxError
from rlx.models import hf, tiny
from rlx.state import load_model_weights
from rlx.tasks import run_training
from tests.support import hook, small_config, straight_and_resumed

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, device="cpu")
LAWS = ("mu_law", "asinh")
GRID = torch.linspace(-3, 3, 601, dtype=torch.float64)


def ids(seed=0):
    return torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- the laws


def test_mu_law_by_hand():
    # μ = 3, s = 1: g(x) = ln(1 + 3|x|) / ln 4 · sign(x)
    # g(0.5) = ln 2.5 / ln 4 = 0.91629 / 1.38629 = 0.66096;  g(1) = 1;  g(-3) = -ln 10 / ln 4 = -1.66096
    # s = 2: f(1) = 2 · g(0.5) = 1.32193
    v = torch.tensor([0.5, 1.0, -3.0])
    assert compand(v, 3.0, 1.0).tolist() == pytest.approx([0.66096, 1.0, -1.66096], abs=1e-5)
    assert compand(torch.tensor([1.0]), 3.0, 2.0).item() == pytest.approx(1.32193, abs=1e-5)


def test_asinh_law_by_hand():
    # μ = 3: g(x) = asinh(3x) / asinh 3;  asinh 3 = ln(3 + √10) = 1.81845;  asinh 1.5 = ln(1.5 + √3.25) = 1.19476
    # g(0.5) = 1.19476 / 1.81845 = 0.65702;  g(1) = 1
    assert compand(torch.tensor([0.5, 1.0]), 3.0, 1.0, "asinh").tolist() == pytest.approx([0.65702, 1.0], abs=1e-5)


@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("mu", [0.5, 3.0, 50.0])
def test_odd_and_strictly_increasing(law, mu):
    f = compand(GRID, mu, 0.7, law)
    assert torch.allclose(compand(-GRID, mu, 0.7, law), -f, atol=1e-12, rtol=0)
    assert (f.diff() > 0).all()


@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("mu", [0.5, 3.0, 50.0])
def test_compresses_above_the_crossover_and_expands_below(law, mu):
    s = 0.7
    f = compand(GRID, mu, s, law)
    above, below = GRID.abs() > s + 1e-9, (GRID.abs() < s - 1e-9) & (GRID != 0)
    assert (f[above].abs() < GRID[above].abs()).all()
    assert (f[below].abs() > GRID[below].abs()).all()
    assert compand(torch.tensor([s, -s], dtype=torch.float64), mu, s, law).tolist() == pytest.approx([s, -s])


@pytest.mark.parametrize("law, slope", [("mu_law", lambda mu: mu / math.log1p(mu)),
                                        ("asinh", lambda mu: mu / math.asinh(mu))])
def test_slope_at_zero_is_above_one_also_for_an_exact_zero(law, slope):
    # f'(0) = g'(0): μ / ln(1 + μ) for the μ-law (3 / ln 4 = 2.16404), μ / asinh μ for asinh (3 / 1.81845 = 1.64976)
    v = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    compand(v, 3.0, 0.1, law).sum().backward()
    assert v.grad.item() == pytest.approx(slope(3.0), rel=1e-9) and v.grad.item() > 1


def test_mu_law_gradients_match_finite_differences():
    x = torch.tensor([-2.0, -0.3, 1e-3, 0.4, 1.7], dtype=torch.float64, requires_grad=True)
    mu = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_MuLaw.apply, (x, mu))


@pytest.mark.parametrize("law", LAWS)
def test_expand_inverts_compand(law):
    w = GRID * 0.05
    assert torch.allclose(compand(expand(w, 4.0, 0.02, law), 4.0, 0.02, law), w, atol=1e-12, rtol=0)
    assert torch.allclose(expand(compand(w, 4.0, 0.02, law), 4.0, 0.02, law), w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("law", LAWS)
def test_small_mu_tends_to_the_identity(law):
    assert torch.allclose(compand(GRID, 1e-7, 0.5, law), GRID, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- on a model


def test_mu_zero_is_the_plain_model_bit_for_bit():
    plain, comp = tiny(**SMALL).model, tiny(**SMALL, parameterization={"name": "compander", "mu": 0}).model
    assert companded(comp) and not companded(plain)
    assert torch.equal(plain(ids()).logits, comp(ids()).logits)


@pytest.mark.parametrize("spec", [{"law": "mu_law"}, {"law": "asinh", "scale": "max", "mu": 20.0},
                                  {"learnable": True}])
def test_starts_from_the_model_as_built(spec):
    plain, comp = tiny(**SMALL).model, tiny(**SMALL, parameterization={"name": "compander", **spec}).model
    assert len(companded(comp)) == 7  # q, k, v, o, gate, up, down of the one block
    torch.testing.assert_close(comp(ids()).logits, plain(ids()).logits, atol=1e-5, rtol=0)


def perturbed(spec):
    """A companded model whose V (and μ) moved away from the start, as after training."""
    policy = tiny(**SMALL, parameterization={"name": "compander", **spec})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "parametrizations" in name:
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 0 else 0.02))
    return policy


@pytest.mark.parametrize("spec", [{}, {"learnable": True, "law": "asinh"}])
def test_merged_export_reproduces_the_companded_model(tmp_path, spec):
    policy = perturbed(spec)
    with torch.no_grad():
        expected = policy.model(ids()).logits
        export_plain(policy.model, policy.tokenizer, tmp_path / "plain")
        loaded = hf(str(tmp_path / "plain"), dtype="float32", device="cpu").model
        assert not companded(loaded)
        torch.testing.assert_close(loaded(ids()).logits, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(merge(policy.model)(ids()).logits, expected, atol=1e-6, rtol=0)
    assert not companded(policy.model)


def test_learned_mu_gets_a_gradient():
    model = tiny(**SMALL, parameterization={"name": "compander", "learnable": True}).model
    model(ids(), labels=ids()).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("log_mu")]
    assert len(grads) == 7 and all(g is not None and g.abs() > 0 for g in grads)


def test_weight_stats_by_hand():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(4, 1, bias=False)

    model = Block()
    with torch.no_grad():  # w = [0.01, 1, -1, 2]: RMS = √((1e-4 + 1 + 1 + 4) / 4) = 1.22475; 0.1 · RMS = 0.1225
        model.q_proj.weight.copy_(torch.tensor([[0.01, 1.0, -1.0, 2.0]]))
    stats = weight_stats(model)
    assert stats["weights/near_zero_share"] == 0.25  # only 0.01
    assert stats["weights/max_abs"] == 2.0
    assert stats["weights/max_over_rms"] == pytest.approx(2 / 1.22475, abs=1e-4)


@pytest.mark.parametrize("bad, message", [({"mu": -1}, "mu"), ({"law": "a_law"}, "law"), ({"scale": "l1"}, "scale"),
                                          ({"mu": 0, "learnable": True}, "learnable")])
def test_bad_options_are_one_clear_error(bad, message):
    with pytest.raises(RlxError, match=message):
        apply_compander(tiny(**SMALL).model, **bad)


def test_unknown_option_and_double_application_are_refused():
    with pytest.raises(RlxError, match="unknown option 'rank'"):
        tiny(**SMALL, parameterization={"name": "compander", "rank": 2})
    model = tiny(**SMALL, parameterization="compander").model
    with pytest.raises(RlxError, match="already parametrized"):
        apply_compander(model)


# ---------------------------------------------------------------------------- in the loop


def test_loop_run_trains_v_and_mu_and_exports_plain_weights(tmp_path):
    over = ["model.parameterization={name:compander,learnable:true}", "trainer.max_steps=3",
            *hook("compander", "rlx.compander.CompanderExport")]
    summary = run_training(small_config(*over), tmp_path)
    assert math.isfinite(summary["train/loss"]) and 0 < summary["weights/near_zero_share"] < 1
    assert summary["compander/mu_mean"] != pytest.approx(3.0, abs=1e-6)  # μ moved
    # the export is the final checkpoint's f(V): rebuild the companded model, load V and μ, compare outputs
    companded_model = tiny(**SMALL, parameterization={"name": "compander", "learnable": True}).model
    load_model_weights(companded_model, tmp_path / "checkpoints" / "last")
    plain = hf(str(tmp_path / "plain"), dtype="float32", device="cpu").model
    assert not companded(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids()).logits, companded_model(ids()).logits, atol=1e-6, rtol=0)


def test_compander_resumes_exactly(tmp_path):
    full, resumed, w_full, w_cut = straight_and_resumed(
        tmp_path, ["model.parameterization={name:compander,learnable:true}", "trainer.lr_scheduler=constant"])
    assert full["train/loss"] == resumed["train/loss"]
    assert any(k.endswith("parametrizations.weight.original") for k in w_full)
    assert any(k.endswith("log_mu") for k in w_full)
    assert w_full.keys() == w_cut.keys() and all(torch.equal(w_full[k], w_cut[k]) for k in w_full)


def test_compander_parameterization_class_is_what_is_registered():
    model = tiny(**SMALL, parameterization="compander").model
    layer = model.model.layers[0].mlp.up_proj
    (p,) = layer.parametrizations["weight"]
    assert isinstance(p, Compander) and p.law == "mu_law" and p.mu == 3.0
    # the fixed scale is the RMS of the weight as built, and f(V) is that weight
    w = layer.weight.detach()
    assert p.scale.item() == pytest.approx(w.pow(2).mean().sqrt().item(), rel=1e-4)
