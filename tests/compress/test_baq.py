"""BAQ's bit allocation (rlx/compress/baq.py): the closed form by hand, the budget, the GPTQ limit, its gain."""
import pytest
import torch

from rlx.compress.baq import allocate, baq_bits, column_sensitivity, round_to_budget
from rlx.compress.gptq import gptq
from tests.support import layer, output_error


def test_closed_form_gives_equal_loss_per_column():
    c = torch.tensor([1.0, 4.0, 16.0, 64.0])
    bits = allocate(c, 3.0, min_bits=0, max_bits=16)
    torch.testing.assert_close(bits, torch.tensor([1.5, 2.5, 3.5, 4.5]))
    torch.testing.assert_close(c * 2 ** (-2 * bits), torch.full((4,), 0.125))  # c_j 2^(-2R_j) = lambda for all j


def test_clamping_refills_the_budget_elsewhere():
    c = torch.tensor([1e-6, 1.0, 1.0, 1.0])  # the first column wants far below the minimum
    bits = allocate(c, 2.0, min_bits=1, max_bits=8)
    assert bits[0] == pytest.approx(1.0) and bits.mean().item() == pytest.approx(2.0, abs=1e-6)
    torch.testing.assert_close(bits[1:], torch.full((3,), 7 / 3))


@pytest.mark.parametrize("avg", [2.0, 2.5, 3.0, 4.2])
def test_integer_bits_respect_the_budget(avg):
    c = torch.rand(97, generator=torch.Generator().manual_seed(0)) * 100 + 0.01
    ints = round_to_budget(allocate(c, avg), avg)
    assert ints.sum() <= 97 * avg and abs(ints.float().mean().item() - avg) < 1 / 97 + 1e-9


def test_uniform_sensitivity_is_gptq_at_that_bit_width():
    w, _ = layer()
    h = torch.eye(64) * 3.0
    bits = baq_bits(h, 3)
    assert (bits == 3).all()
    torch.testing.assert_close(gptq(w, h, bits).decode(), gptq(w, h, 3).decode(), rtol=0, atol=0)


def test_sensitivity_is_one_over_the_squared_cholesky_diagonal():
    h = torch.diag(torch.tensor([4.0, 1.0]))  # diagonal H: d_j = 1/sqrt(H_jj (1 + damp'))
    c = column_sensitivity(h, damp=0.0)
    torch.testing.assert_close(c, torch.tensor([4.0, 1.0]))


@pytest.mark.parametrize("avg", [2, 3, 4])
def test_baq_beats_gptq_at_equal_average_bits_on_outlier_channels(avg):
    """Eight input channels ten times larger than the rest (as LLM activations have): BAQ spends bits there."""
    w, h = layer()
    scale = torch.ones(64)
    scale[:8] = 10.0
    h = h * scale[:, None] * scale[None, :]
    bits = baq_bits(h, avg)
    assert bits.float().mean().item() == avg and bits[:8].float().mean() > avg
    assert output_error(w, gptq(w, h, bits).decode(), h) < 0.5 * output_error(w, gptq(w, h, avg).decode(), h)
