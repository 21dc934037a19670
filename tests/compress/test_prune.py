"""Pruning (rlx/compress/prune.py, `rlx prune`): the masks by hand, exact sparsity, and the command end to end."""
import json

import pytest
import torch

from rlx.compress.prune import Magnitude, Wanda, keep_mask
from rlx.compress.run import run_prune, run_quantize
from rlx.config import compose_config
from rlx.errors import RlxError
from rlx.models import hf
from tests.support import SMALL_COMPRESS as SMALL


def test_magnitude_drops_the_smallest_weights_of_the_layer():
    w = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
    torch.testing.assert_close(w * Magnitude()(w, torch.eye(2), 0.5), torch.tensor([[0.0, -3.0], [0.0, 2.0]]))


def test_wanda_weighs_by_the_input_norm_within_each_row():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    h = torch.diag(torch.tensor([100.0, 1.0]))  # input norms 10 and 1: scores [[10, 2], [30, 4]]
    torch.testing.assert_close(w * Wanda()(w, h, 0.5), torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    # with equal input norms Wanda is magnitude pruning row by row
    torch.testing.assert_close(Wanda()(w, torch.eye(2), 0.5), keep_mask(w.abs(), 0.5, per_row=True))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75])
def test_sparsity_is_exact(per_row, sparsity):
    score = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    keep = keep_mask(score, sparsity, per_row)
    assert (~keep).sum() == sparsity * score.numel()
    if per_row:
        assert ((~keep).sum(dim=1) == sparsity * 64).all()


def test_two_of_four():
    score = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    keep = keep_mask(score, 0.0, per_row=True, n_m=(2, 4))
    assert (keep.reshape(8, 4, 4).sum(dim=2) == 2).all()
    kept = score.reshape(8, 4, 4)[keep.reshape(8, 4, 4)].reshape(8, 4, 2)
    dropped = score.reshape(8, 4, 4)[~keep.reshape(8, 4, 4)].reshape(8, 4, 2)
    assert (kept.min(dim=2).values >= dropped.max(dim=2).values).all()  # the two largest of each four stay


@pytest.mark.parametrize("method, extra", [("magnitude", []), ("wanda", []), ("wanda", ["n_m=[2,4]"])])
def test_prune_command_prunes_every_layer_and_nothing_else(method, extra, tmp_path):
    summary = run_prune(compose_config("prune", [*SMALL, f"method={method}", "sparsity=0.5", *extra]), tmp_path)
    report = json.loads((tmp_path / "model" / "pruning.json").read_text())
    weights = hf(str(tmp_path / "model"), dtype="float32", device="cpu").model.state_dict()
    assert summary["sparsity"] == 0.5 and len(report["layers"]) == 2 * 7
    for name, info in report["layers"].items():
        assert info["sparsity"] == 0.5 and (weights[name + ".weight"] == 0).float().mean() == 0.5
    assert all((w != 0).all() for n, w in weights.items() if "norm" in n)


@pytest.mark.parametrize("run, overrides, message", [
    (run_prune, ["sparsity=1.0"], "sparsity=1.0 must lie in"),
    (run_prune, ["n_m=[3,2]"], "give \\[N, M\\]"),
    (run_prune, ["method=gptq"], "unknown method option 'gptq'; valid: dpruner, magnitude, wanda"),
    (run_quantize, ["method=wanda"], "unknown method option 'wanda'; valid: baq, gptq, hqq, rtn"),
])
def test_bad_input_is_one_clear_error(run, overrides, message, tmp_path):
    name = "prune" if run is run_prune else "quantize"
    with pytest.raises(RlxError, match=message):
        run(compose_config(name, [*SMALL, *overrides]), tmp_path)
