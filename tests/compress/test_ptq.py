"""`rlx quantize` end to end on a small model: every layer on its grid, GPTQ and BAQ below RTN, a
checkpoint transformers loads, and one clear line for bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rlx.cli import app
from rlx.compress.gptq import Codes
from rlx.compress.run import run_quantize
from rlx.config import build, compose_config
from rlx.errors import RlxError
from rlx.models import hf
from tests.support import SMALL_COMPRESS as SMALL


def quantize(tmp_path, *overrides):
    return run_quantize(compose_config("quantize", [*SMALL, *overrides]), tmp_path)


@pytest.mark.parametrize("method", ["rtn", "gptq", "baq", "hqq"])
def test_every_layer_is_on_its_grid_and_the_rest_untouched(method, tmp_path):
    summary = quantize(tmp_path, f"method={method}", "bits=2")
    before = build(compose_config("quantize", SMALL).model).model.state_dict()
    after = hf(str(tmp_path / "model"), dtype="float32", device="cpu").model.state_dict()
    report = json.loads((tmp_path / "model" / "quantization.json").read_text())
    stored = load_file(str(tmp_path / "model" / "quantization.safetensors"))
    assert summary["average_bits"] == report["average_bits"] == 2.0
    assert len(report["layers"]) == 2 * 7
    for name, w in after.items():
        layer = name.removesuffix(".weight")
        if layer in report["layers"]:
            info = report["layers"][layer]
            # the sidecar's integer codes decode to exactly the checkpoint's weights
            codes = Codes(*(stored[f"{layer}.{k}"] for k in ("codes", "scale", "zero", "grid", "bits")))
            assert codes.codes.dtype == torch.uint8 and int(codes.codes.max()) < 2 ** int(codes.bits.max())
            torch.testing.assert_close(codes.decode(), w, rtol=0, atol=0)
            # an affine grid of 2^b points per row for each bit-width b its columns use (BAQ: several)
            most = sum(2**b for b in range(int(info["min_bits"]), int(info["max_bits"]) + 1))
            assert max(len(row.unique()) for row in w) <= most
            assert method == "baq" or most == 4
        else:  # embeddings, norms, the (tied) head
            torch.testing.assert_close(w, before[name], rtol=0, atol=0)


def test_gptq_and_baq_leave_less_output_error_than_rtn(tmp_path):
    errors = {m: quantize(tmp_path / m, f"method={m}", "bits=3")["mean_relative_error"] for m in ("rtn", "gptq", "baq")}
    assert errors["baq"] < errors["gptq"] < errors["rtn"]


def test_hqq_fits_the_weights_closer_than_round_to_nearest():
    """HQQ optimizes the grid for the weights themselves (no data): its weight error is below RTN's."""
    from rlx.compress.gptq import rtn
    from rlx.compress.ptq import HQQ

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):
        q = HQQ()(w, None, bits, 0, False).decode()
        assert (q - w).norm() < (rtn(w, bits).decode() - w).norm()
        assert max(len(row.unique()) for row in q) <= 2**bits
    with pytest.raises(RlxError, match="asymmetric"):
        HQQ()(w, None, 3, 0, True)


def test_eight_bits_is_near_lossless(tmp_path):
    original = quantize(tmp_path / "16", "method=rtn", "bits=16")
    eight = quantize(tmp_path / "8", "method=gptq", "bits=8")
    assert eight["mean_relative_error"] < 1e-4
    assert eight["eval/loss"] == pytest.approx(original["eval/loss"], rel=1e-2)


@pytest.mark.parametrize("overrides, message", [
    (["bits=0"], "bits=0 must lie in 1..16"),
    (["calib.samples=0"], "calib.samples must be >= 1"),
    (["checkpoint=/nonexistent/run"], "does not exist"),
])
def test_bad_input_is_one_clear_error(overrides, message, tmp_path):
    with pytest.raises(RlxError, match=message):
        quantize(tmp_path, *overrides)


@pytest.mark.parametrize("files, message", [
    ({"notes.txt": "not a model"}, "holds no checkpoint"),
    ({"config.json": "{not json"}, "cannot load model"),
])
def test_a_checkpoint_that_is_not_a_model_is_one_clear_error(files, message, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(RlxError, match=message):
        quantize(tmp_path / "run", f"checkpoint={folder}")


def test_the_command_exits_with_one_line(tmp_path):
    result = CliRunner().invoke(app, ["quantize", *SMALL, "method=nope", f"hydra.run.dir={tmp_path}"])
    assert result.exit_code == 1 and "unknown method option 'nope'" in result.output
