"""Round-to-nearest and GPTQ on one layer (rlx/compress/gptq.py): the grid by hand, GPTQ's limits and its gain."""
import pytest
import torch

from rlx.compress.gptq import Grid, column_bits, gptq, rtn
from tests.support import layer, output_error


def test_grid_by_hand():
    # row [-1, 0.5, 2] at 2 bits, asymmetric: scale 3/3 = 1, zero round(1) = 1 -> values -1, 0 (0.5 rounds to even), 2
    grid = Grid.fit(torch.tensor([[-1.0, 0.5, 2.0]]), bits=2)
    assert grid.scale.item() == 1.0 and grid.zero.item() == 1.0
    torch.testing.assert_close(grid(torch.tensor([[-1.0, 0.5, 2.0]])), torch.tensor([[-1.0, 0.0, 2.0]]))
    # symmetric: range [-2, 2] over 3 steps
    sym = Grid.fit(torch.tensor([[-1.0, 0.5, 2.0]]), bits=2, symmetric=True)
    assert sym.scale.item() == pytest.approx(4 / 3) and sym.zero.item() == 2.0
    # an all-zero row stays zero
    assert Grid.fit(torch.zeros(1, 3), bits=2)(torch.zeros(1, 3)).abs().max() == 0


@pytest.mark.parametrize("group_size", [0, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_with_identity_hessian_is_round_to_nearest(group_size, symmetric):
    w, _ = layer()
    q = gptq(w, torch.eye(64), bits=3, group_size=group_size, symmetric=symmetric, block_size=32).decode()
    torch.testing.assert_close(q, rtn(w, 3, group_size, symmetric).decode(), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("options", [{}, {"group_size": 16}, {"act_order": True}, {"block_size": 8}])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, options):
    w, h = layer()
    group = options.get("group_size", 0)
    ours, floor = output_error(w, gptq(w, h, bits, **options).decode(), h), output_error(w, rtn(w, bits, group).decode(), h)
    assert ours < 0.9 * floor, (ours, floor)


def test_eight_bits_is_near_lossless():
    w, h = layer()
    assert output_error(w, gptq(w, h, 8).decode(), h) < 1e-4 and output_error(w, rtn(w, 8).decode(), h) < 1e-4


def test_block_size_does_not_change_the_result():
    """Lazy batch updates are an ordering of the same arithmetic."""
    w, h = layer()
    torch.testing.assert_close(gptq(w, h, 3, block_size=64).decode(), gptq(w, h, 3, block_size=7).decode(), rtol=1e-4, atol=1e-4)


def test_per_column_bits():
    w, h = layer()
    torch.testing.assert_close(gptq(w, h, torch.full((64,), 3)).decode(), gptq(w, h, 3).decode())
    mixed = gptq(w, h, torch.tensor([2, 6] * 32)).decode()
    assert output_error(w, gptq(w, h, 2).decode(), h) > output_error(w, mixed, h) > output_error(w, gptq(w, h, 6).decode(), h)
    with pytest.raises(ValueError, match="per input column"):
        column_bits([3, 3], 64)
    with pytest.raises(ValueError, match="1..16"):
        column_bits(0, 4)


def test_dead_inputs_are_zeroed():
    w, h = layer()
    h[5, :] = h[:, 5] = 0
    assert gptq(w, h, 4).decode()[:, 5].abs().max() == 0
