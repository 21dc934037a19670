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
for path in sys.argv[1:]:
    w, h, scale, zero, bits, act_order, out = torch.load(path)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="channel",
                            actorder="static" if act_order else None)
    # compressed-tensors counts codes from -2^(bits-1): the same grid with the zero point shifted
    zp = (zero - 2 ** (bits - 1)).to(torch.int8)[:, None]
    q, _, fallback = quantize_weight(w[None].clone(), h[None].clone(), scale[:, None][None], zp[None], None, args,
                                     blocksize=16, percdamp=0.01)
    assert not fallback.any()
    torch.save(q[0], out)
"""
CASES = [(bits, act_order) for bits in (2, 3, 4, 8) for act_order in (False, True)]


def case(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(512, 64, generator=g)
    x[:, 1::2] += x[:, ::2]  # correlated inputs, so the error feedback matters
    w, h = torch.randn(32, 64, generator=g), x.T @ x
    return w, h, Grid.fit(w, bits)


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    """llm-compressor's result for every case, from one child process (its import takes seconds)."""
    pytest.importorskip("llmcompressor", reason="llm-compressor is installed by `make install`")
    folder = tmp_path_factory.mktemp("peer")
    inputs = []
    for bits, act_order in CASES:
        w, h, grid = case(bits)
        inputs.append(folder / f"in_{bits}_{act_order}.pt")
        torch.save((w, h, grid.scale, grid.zero, bits, act_order, str(folder / f"q_{bits}_{act_order}.pt")), inputs[-1])
    run = subprocess.run([sys.executable, "-c", PEER, *map(str, inputs)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return {(bits, act_order): torch.load(folder / f"q_{bits}_{act_order}.pt") for bits, act_order in CASES}


@pytest.mark.parametrize("bits,act_order", CASES)
def test_gptq_matches_llm_compressor(bits, act_order, theirs):
    w, h, _ = case(bits)
    ours = gptq(w, h, bits, 0, False, damp=0.01, act_order=act_order, block_size=16).decode()
    assert not torch.equal(ours, w)  # something was quantized
    torch.testing.assert_close(ours, theirs[bits, act_order], rtol=0, atol=1e-6)
