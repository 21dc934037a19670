"""TRP: the energy rank and truncation by hand, the nuclear subgradient, substitution in a run
(every target at most the energy rank right after it), the nuclear term in the gradient, the
low-rank export, exact resume and bad settings."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rlx.errors import RlxError
from rlx.lowrank.trp import TRP, energy_rank, nuclear_subgradient, truncate
from rlx.models import tiny
from rlx.tasks import run_training
from tests.support import SUBSTITUTIONS, small_config, straight_and_resumed

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, device="cpu")




def test_energy_one_leaves_w_unchanged():
    W = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert energy_rank(torch.linalg.svdvals(W), 1.0) == 4
    assert torch.equal(truncate(W, 1.0), W)


def test_diag_3210_at_energy_09_keeps_rank_2():
    # energies 9, 4, 1, 0 of 14: cumulative 0.643, 0.929 -> the first reaching 0.9 is r = 2
    W = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0.9) == 2
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0, 0.0]), 9 / 14) == 1  # reaching the threshold is enough
    assert torch.allclose(truncate(W, 0.9), torch.diag(torch.tensor([3.0, 2.0, 0.0, 0.0])), atol=1e-6)


def test_nuclear_subgradient_by_hand():
    assert torch.allclose(nuclear_subgradient(torch.diag(torch.tensor([3.0, 2.0, 1.0]))), torch.eye(3), atol=1e-6)
    u, v = torch.tensor([0.6, 0.8, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert torch.allclose(nuclear_subgradient(5 * torch.outer(u, v)), torch.outer(u, v), atol=1e-6)


def test_substitution_keeps_the_energy_rank_and_the_nuclear_term_is_its_subgradient():
    model = tiny(**SMALL).model
    trp = TRP(energy=0.9, nuclear_weight=0.5)
    trp.on_train_start(SimpleNamespace(model=model))
    before = {n: m.weight.detach().clone() for n, m in trp.layers.items()}
    ranks = trp.substitute()
    for name, layer in trp.layers.items():
        W = layer.weight.detach()
        assert ranks[name] == energy_rank(torch.linalg.svdvals(before[name]), 0.9) < min(W.shape)
        assert torch.allclose(W, truncate(before[name], 0.9), atol=1e-6)
        layer.weight.grad = torch.zeros_like(W)
    trp.on_after_backward(None)
    for layer in trp.layers.values():  # λ·U_r V_rᵀ, the subgradient at the substituted weights
        assert torch.allclose(layer.weight.grad, 0.5 * nuclear_subgradient(layer.weight.detach()), atol=1e-5)


def test_every_target_is_at_most_the_energy_rank_right_after_a_substitution(tmp_path):
    cfg = small_config("hooks=trp", "hooks.trp.period=2", "trainer.max_steps=5",
                       "hooks.trp._target_=tests.support.ProbedTRP")
    summary = run_training(cfg, tmp_path)
    assert [step for step, _, _ in SUBSTITUTIONS] == [0, 2, 4]
    for _, actual, kept in SUBSTITUTIONS:
        assert len(actual) == 7 and all(actual[n] <= kept[n] for n in kept)
    assert any(kept[n] < 32 for _, _, kept in SUBSTITUTIONS for n in kept)  # something was cut
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("trp/rank_mean" in r for r in rows) == 3 and 0 < summary["trp/export_rank_ratio"] <= 1


def test_export_factors_multiply_back_to_the_trained_weights(tmp_path):
    run_training(small_config("hooks=trp", "trainer.max_steps=3", "hooks.trp.export_threshold=0.02"), tmp_path)
    weights = load_file(tmp_path / "checkpoints/last/model.safetensors")
    factors = load_file(tmp_path / "low_rank/factors.safetensors")
    report = json.loads((tmp_path / "low_rank/low_rank.json").read_text())
    assert len(report["layers"]) == 7 and "lm_head" not in str(report["layers"])
    for name, info in report["layers"].items():
        W, up, down = weights[f"{name}.weight"], factors[f"{name}.up"], factors[f"{name}.down"]
        m, n = W.shape
        assert up.shape == (m, info["rank"]) and down.shape == (info["rank"], n)
        assert torch.linalg.matrix_norm(W - up @ down, ord=2) < 0.02 + 1e-5  # dropped σ_i are all below τ
        assert info["params_after"] == info["rank"] * (m + n) and info["params_before"] == m * n
    assert report["params_after"] == sum(v["params_after"] for v in report["layers"].values())


def test_resume_is_exact(tmp_path):
    # period 3: the straight run substitutes at steps 0 and 3; the resumed one at 3, after the cut at 2
    full, resumed, a, b = straight_and_resumed(tmp_path, ["hooks=trp", "hooks.trp.period=3",
                                                          "trainer.lr_scheduler=constant"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["train/loss"] == resumed["train/loss"]
    assert full["trp/export_rank_mean"] == resumed["trp/export_rank_mean"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(period=0), "period=0 must be an integer >= 1"),
    (dict(energy=0.0), r"energy=0.0 must lie in \(0, 1\]"),
    (dict(nuclear_weight=-1.0), "must be >= 0"),
])
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(RlxError, match=message):
        TRP(**kwargs)


def test_no_matching_layers_is_one_clear_error():
    with pytest.raises(RlxError, match="found no trainable attention/MLP linear layers"):
        TRP(targets="no_such_layer").on_train_start(SimpleNamespace(model=tiny(**SMALL).model))
