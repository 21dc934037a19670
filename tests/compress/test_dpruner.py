"""D-Pruner (rlx/compress/dpruner.py): the general importance against the exact OBS error, the dual
score by hand, its limits (λ = 0: the domain Taylor score; no domain gradient: λ·G·W²), the
penalty pulling the kept set toward the general ranking, and `rlx prune method=dpruner`."""
import json

import pytest
import torch

from rlx.compress.dpruner import DPruner, dual_score, general_importance
from rlx.compress.prune import keep_mask
from rlx.compress.run import general_task, run_prune
from rlx.config import build, compose_config
from rlx.data.collate import lm_batch
from rlx.errors import RlxError
from rlx.models import hf
from rlx.seeding import seed_everything
from tests.support import SMALL_COMPRESS as SMALL


def test_general_importance_is_the_obs_error_of_removing_one_weight():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(50, 4, generator=gen, dtype=torch.float64)
    x[:, 1] += x[:, 0]  # correlated inputs: refitting the others matters
    eps = general_importance(w, x.T @ x, damp=0.0)
    for i in range(3):
        for j in range(4):
            others = [k for k in range(4) if k != j]
            # zero W_ij and refit the rest of row i by least squares; ε is half the least error left
            refit = torch.linalg.lstsq(x[:, others], x @ w[i], driver="gelsd").solution
            error = ((x @ w[i] - x[:, others] @ refit) ** 2).sum()
            torch.testing.assert_close(eps[i, j], 0.5 * error)


def test_the_weight_that_carries_more_of_the_output_is_more_important():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(1))
    w = torch.tensor([[2.0, 1.0]])  # y = 2 x1 + x2 with inputs of equal scale: w1 matters more
    eps = general_importance(w, x.T @ x, damp=0.0)
    assert eps[0, 0] > eps[0, 1]
    x[:, 1] *= 10  # now x2 carries ten times the signal: the smaller weight matters more
    eps = general_importance(w, x.T @ x, damp=0.0)
    assert eps[0, 1] > eps[0, 0]


def test_dual_score_by_hand():
    g, w, general = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.5])
    # gW = [1, -1]; |gW - (gW)^2/2| = [0.5, 1.5]; lam G W^2 = 0.1 * [4, 0.5] = [0.4, 0.05]
    torch.testing.assert_close(dual_score(g, w, general, lam=0.1), torch.tensor([0.9, 1.55]))
    # no domain gradient: what is left is the generality penalty of zeroing the weight, lam G W^2
    torch.testing.assert_close(dual_score(torch.zeros(2), w, general, lam=0.1), torch.tensor([0.4, 0.05]))


def _setup(samples=16, batch_size=8):
    cfg = compose_config("prune", [*SMALL, "calib.general=shakespeare", "calib.max_length=64"])
    torch.manual_seed(0)
    policy = build(cfg.model)

    def batches(task):
        ex = task.split("train")[:samples]
        return [lm_batch(ex[i:i + batch_size], policy.tokenizer, 64) for i in range(0, samples, batch_size)]

    return policy.model, batches(general_task("shakespeare")), batches(build(cfg.data))


def test_with_lam_zero_one_step_is_the_domain_taylor_score_and_the_model_is_left_as_it_was():
    model, general, domain = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = DPruner(lam=0.0, epochs=1).scores(model, general, domain[:1], progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None
    modules = dict(model.named_modules())
    names = list(scores)
    grads = torch.autograd.grad(model(**domain[0]).loss, [modules[n].weight for n in names])
    for n, g in zip(names, grads):
        gw = g * modules[n].weight.detach()
        torch.testing.assert_close(scores[n], (gw - 0.5 * gw**2).abs())


def test_the_penalty_pulls_the_kept_weights_toward_the_general_ranking():
    model, general, domain = _setup()
    g_map = DPruner().general_map(model, general, progress=False)

    def overlap(lam):
        scores = DPruner(lam=lam, lr=0.03, epochs=2).scores(model, general, domain, progress=False)
        kept = [keep_mask(scores[n], 0.5, per_row=False) for n in g_map]
        general_kept = [keep_mask(g_map[n], 0.5, per_row=False) for n in g_map]
        return sum((a & b).sum().item() for a, b in zip(kept, general_kept)) / sum(k.sum().item() for k in kept)

    shares = [overlap(lam) for lam in (0.0, 3.0, 30.0)]
    assert shares[0] < shares[1] < shares[2]
    assert shares[2] > 0.9  # a strong penalty keeps nearly the general set (G·W² ranks close to G)


def test_prune_command_with_dpruner_prunes_the_original_weights(tmp_path):
    overrides = [*SMALL, "method=dpruner", "calib.general=shakespeare", "calib.max_length=64", "sparsity=0.5"]
    summary = run_prune(compose_config("prune", overrides), tmp_path)
    seed_everything(0)  # the same init the command built
    original = build(compose_config("prune", overrides).model).model.state_dict()
    pruned = hf(str(tmp_path / "model"), dtype="float32", device="cpu").model.state_dict()
    report = json.loads((tmp_path / "model" / "pruning.json").read_text())
    assert summary["sparsity"] == 0.5 and "general/perplexity" in summary and len(report["layers"]) == 2 * 7
    for name in report["layers"]:
        w, w0 = pruned[name + ".weight"], original[name + ".weight"]
        assert (w == 0).float().mean() == 0.5
        torch.testing.assert_close(w[w != 0], w0[w != 0])  # kept weights are the originals, not fine-tuned ones


@pytest.mark.parametrize("overrides, message", [
    (["method=dpruner"], "Missing mandatory value: calib.general"),  # its config declares it ???
    (["method=dpruner", "calib.general=null"], "needs an open-domain calibration set"),
    (["method=dpruner", "calib.general=wikipedia"], "is not a data config"),
    (["method=dpruner", "calib.general=shakespeare", "method.lam=50"], "must stay below 1"),
])
def test_bad_dpruner_input_is_one_clear_error(overrides, message, tmp_path):
    with pytest.raises(RlxError, match=message):
        run_prune(compose_config("prune", [*SMALL, *overrides]), tmp_path)
