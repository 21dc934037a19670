"""rlx's GPTQ against llm-compressor's (`quantize_weight`, the GPTQ kernel of vLLM's compression
library) on the same layer, Hessian and grid. llm-compressor runs in a child process: importing it
sets up its own logging and global compression state, which the rest of the suite should not inherit."""
import subprocess
import sys

import pytest
import torch

from rlx.compress.gptq import Grid, gptq

PEER = """
import sys, torch
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
w, h, scale, zero, bits, act_order, out = torch.load(sys.argv[1])
args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="channel",
                        actorder="static" if act_order else None)
# compressed-tensors counts codes from -2^(bits-1): the same grid with the zero point shifted
zp = (zero - 2 ** (bits - 1)).to(torch.int8)[:, None]
q, _, fallback = quantize_weight(w[None].clone(), h[None].clone(), scale[:, None][None], zp[None], None, args,
                                 blocksize=16, percdamp=0.01)
assert not fallback.any()
torch.save(q[0], out)
"""


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_matches_llm_compressor(bits, act_order, tmp_path):
    pytest.importorskip("llmcompressor", reason="llm-compressor is installed by `make install`")
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(512, 64, generator=g)
    x[:, 1::2] += x[:, ::2]  # correlated inputs, so the error feedback matters
    w, h = torch.randn(32, 64, generator=g), x.T @ x
    grid = Grid.fit(w, bits)
    torch.save((w, h, grid.scale, grid.zero, bits, act_order, str(tmp_path / "q.pt")), tmp_path / "in.pt")
    run = subprocess.run([sys.executable, "-c", PEER, str(tmp_path / "in.pt")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = torch.load(tmp_path / "q.pt")
    ours = gptq(w, h, bits, 0, False, damp=0.01, act_order=act_order, block_size=16).decode()
    assert not torch.equal(ours, w)  # something was quantized
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
