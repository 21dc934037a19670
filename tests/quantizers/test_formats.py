"""Weight formats: grid values, exact re-encoding, packing, and unbiased seeded stochastic rounding."""
import pytest
import torch

from rlx.quantizers.formats import FP8, Grid, IntN

FORMATS = [FP8("channel"), FP8("tensor"), IntN(4, 32), IntN(2, 16), IntN(3, 0), IntN(8, 32), Grid(0.05)]


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
def test_decoding_lands_on_the_grid_and_re_encodes_exactly(fmt):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = fmt.encode(w)
    back = fmt.decode(q)
    assert back.shape == w.shape and back.dtype == w.dtype
    for rounding in ("nearest", "stochastic"):
        assert torch.equal(fmt.decode(fmt.encode(back, rounding, torch.Generator().manual_seed(1))), back)


def test_int4_by_hand():
    # one group: amax 1.4 -> scale 0.2; the codes are round(w / 0.2) within [-8, 7], packed two per byte
    w = torch.tensor([[1.4, -0.31, 0.05, -1.4]])
    q = IntN(4, 4).encode(w)
    assert q.codes.numel() == 2 and q.codes.dtype == torch.uint8
    assert torch.allclose(IntN(4, 4).decode(q), torch.tensor([[1.4, -0.4, 0.0, -1.4]]))


def test_fp8_by_hand():
    # per-tensor scale 2/448: 2 -> 448 exactly; 0.3 -> 67.2 -> the nearest E4M3 value 64 (spacing 8 in [64, 128))
    q = FP8("tensor").encode(torch.tensor([[2.0, 0.3]]))
    assert q.codes.dtype == torch.float8_e4m3fn
    assert torch.allclose(FP8("tensor").decode(q), torch.tensor([[2.0, 64 * 2 / 448]]))


@pytest.mark.parametrize("fmt", [FP8("tensor"), IntN(4, 0), Grid(0.05)], ids=repr)
def test_stochastic_rounding_is_unbiased_and_seeded(fmt):
    w = torch.tensor([[1.0, 0.3, -0.537, 0.01]])  # 1.0 fixes the scale; the rest fall between grid points
    draws = torch.stack([fmt.decode(fmt.encode(w, "stochastic", torch.Generator().manual_seed(s))) for s in range(4000)])
    nearest = fmt.decode(fmt.encode(w))
    assert torch.allclose(draws.mean(0), w, atol=4e-3)  # unbiased, where rounding to nearest is not
    assert not torch.allclose(nearest, w, atol=4e-3)
    assert len({tuple(d.tolist()[0]) for d in draws}) > 1
    a, b = (fmt.decode(fmt.encode(w, "stochastic", torch.Generator().manual_seed(7))) for _ in range(2))
    assert torch.equal(a, b)
