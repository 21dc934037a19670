"""Quantization-robustness metrics: the error decomposition's identities, the outlier statistics
on known distributions, the report on the tiny model, and the probe inside a run."""
import math

import pytest
import torch

from rlx.data.collate import lm_batch
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.quantizers.formats import IntN
from rlx.robustness import (
    RobustnessProbe,
    kurtosis,
    max_to_mean,
    max_to_median,
    quantize_tokens,
    quantized,
    relative_terms,
    robustness_report,
    split_error,
)
from rlx.tasks import run_training
from tests.support import small_config


def linear_pair():
    """A random linear layer f, its W4 RTN copy f^q, an input h and a perturbed input h^q (seed 0)."""
    g = torch.Generator().manual_seed(0)
    f = torch.nn.Linear(16, 8)
    with torch.no_grad():
        f.weight.copy_(torch.randn(8, 16, generator=g))
        f.bias.copy_(torch.randn(8, generator=g))
    fq = torch.nn.Linear(16, 8)
    fmt = IntN(4, group_size=0)
    with torch.no_grad():
        fq.weight.copy_(fmt.decode(fmt.encode(f.weight)))
        fq.bias.copy_(f.bias)
    h = torch.randn(32, 16, generator=g)
    hq = h + 0.1 * torch.randn(32, 16, generator=g)
    return f, fq, h, hq


@torch.no_grad()
def test_decomposition_sums_to_the_output_error():
    f, fq, h, hq = linear_pair()
    a, b = split_error(f(h), f(hq), fq(h), fq(hq))
    assert torch.allclose(a + b, fq(hq) - f(h), atol=1e-6)
    t = relative_terms(a, b, f(h))
    assert t["A"] > 0 and t["B"] > 0
    assert t["A"] + t["B"] + t["C"] == pytest.approx(t["R"], rel=1e-12)
    assert t["R"] == pytest.approx(((fq(hq) - f(h)).pow(2).sum() / f(h).pow(2).sum()).item(), rel=1e-5)


@torch.no_grad()
def test_an_exact_function_adds_no_local_error():
    f, _, h, hq = linear_pair()
    a, b = split_error(f(h), f(hq), f(h), f(hq))  # f^q = f
    assert torch.count_nonzero(b) == 0
    t = relative_terms(a, b, f(h))
    assert t["B"] == t["C"] == 0 and t["R"] == pytest.approx(t["A"], rel=1e-12)


@torch.no_grad()
def test_an_exact_input_propagates_no_error():
    f, fq, h, _ = linear_pair()
    a, b = split_error(f(h), f(h), fq(h), fq(h))  # h^q = h
    assert torch.count_nonzero(a) == 0
    t = relative_terms(a, b, f(h))
    assert t["A"] == t["C"] == 0 and t["R"] == pytest.approx(t["B"], rel=1e-12)


def test_outlier_statistics_of_known_distributions():
    x = torch.tensor([1.0, -1.0, 1.0, 5.0])
    assert max_to_mean(x) == pytest.approx(2.5)
    assert max_to_median(x) == pytest.approx(5.0)
    assert kurtosis(torch.linspace(-1, 1, 10001)).item() == pytest.approx(1.8, abs=1e-4)
    gaussian = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    assert kurtosis(gaussian).item() == pytest.approx(3.0, abs=0.03)


def test_token_quantization_keeps_each_token_maximum():
    x = torch.tensor([[0.3, -1.0, 0.52], [0.0, 0.0, 0.0]])
    q = quantize_tokens(x, 4)  # scale 1/7 for the first token; the zero token stays zero
    assert torch.allclose(q[0], torch.tensor([2 / 7, -1.0, 4 / 7]))
    assert torch.equal(q[1], x[1])


@pytest.fixture(scope="module")
def model_and_batch():
    policy = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, device="cpu")
    texts = ["To be, or not to be, that is the question:", "Friends, Romans, countrymen", "Now is the winter"]
    return policy.model.eval(), lm_batch([{"text": t} for t in texts], policy.tokenizer, 64)


def test_report_on_the_tiny_model(model_and_batch):
    model, batch = model_and_batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r8, r2 = robustness_report(model, batch, bits=8), robustness_report(model, batch, bits=2)
    for r in (r8, r2):
        numbers = [v for v in r.values() if isinstance(v, float)]
        numbers += [v for layer in r["layers"] for v in layer.values()]
        numbers += [v for stats in r["linears"].values() for v in stats.values()]
        assert all(math.isfinite(v) for v in numbers)
        assert r["layers"][0]["A"] == 0  # the embeddings are not quantized: the first block's input is exact
        assert len(r["layers"]) == 2 and len(r["linears"]) == 14  # 7 linear layers per block
        assert r["R_L"] == r["layers"][-1]["R"]
    assert r8["R_L"] < 1e-3 and abs(r8["ptq_loss_increase"]) < 1e-2  # 8 bits is nearly lossless
    assert r2["R_L"] > 100 * r8["R_L"]
    assert r8["mmr_mean"] == r2["mmr_mean"] > 1  # input statistics are of the full-precision model
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is left as it was
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_quantized_restores_the_weights_after_an_error(model_and_batch):
    model, _ = model_and_batch
    w = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(ValueError), quantized(model.model.layers, 4):
        assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, w)
        raise ValueError
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, w)


def test_bad_settings_fail_in_one_line(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(RlxError, match="bits=5"):
        robustness_report(model, batch, bits=5)
    with pytest.raises(RlxError, match="every=-1"):
        RobustnessProbe(every=-1)
    with pytest.raises(RlxError, match="no decoder layers"):
        robustness_report(torch.nn.Linear(2, 2), batch)


def test_probe_reports_at_the_end_of_a_run(tmp_path):
    summary = run_training(small_config("hooks=robustness", "hooks.robustness.samples=4"), tmp_path)
    for key in ("R_L", "mmr_mean", "max_to_median_mean", "kurtosis_mean", "ptq_loss_increase", "R_0"):
        assert math.isfinite(summary[f"robustness/{key}"])


def test_probe_every_steps_measures_once_per_step(tmp_path):
    summary = run_training(small_config("hooks=robustness", "hooks.robustness.every=1",
                                        "hooks.robustness.samples=2"), tmp_path)
    logged = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "robustness/R_L" in line]
    assert len(logged) == 2 and "robustness/R_L" in summary  # steps 1 and 2; the end adds no third
