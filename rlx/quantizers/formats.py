"""Low-precision weight formats: how a weight matrix becomes codes plus scales and back.

    fmt = fp8(scale="channel")            # E4M3 codes (torch.float8_e4m3fn), one fp32 scale per row
    fmt = intn(bits=4, group_size=32)     # signed integers, two per byte, one fp32 scale per group
    q = fmt.encode(w, rounding="stochastic", generator=g)
    w_hat = fmt.decode(q)                 # fp32, on the grid; fmt.decode(fmt.encode(w_hat)) == w_hat

Codes are what a quantizer stores between steps, so `Quantized.nbytes` is the real cost.
Rounding is to the nearest grid point or stochastic (up with probability equal to the distance
from the lower neighbour over the gap): stochastic rounding is unbiased, E[decode] = w, and
takes a `torch.Generator` so runs are reproducible. Scales are recomputed from the absolute
maximum on every encode, which maps a grid point back to itself (re-encoding is exact).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlx.errors import RlxError

ROUNDINGS = ("nearest", "stochastic")
FP8_MAX = 448.0  # largest finite E4M3 value
FP8_TOP = 0x7E  # its bit pattern: the positive E4M3 codes 0..0x7E are increasing in value


@dataclass
class Quantized:
    codes: Tensor  # float8_e4m3fn, or uint8 holding two signed 4-bit (or one 8-bit) integers
    scales: Tensor  # fp32: one per tensor, row or group
    shape: torch.Size
    dtype: torch.dtype = torch.float32  # what decode returns: the weight's own dtype

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def _round(y: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
    if rounding == "nearest":
        return torch.round(y)
    return torch.floor(y + torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype))


def _safe(amax: Tensor, top: float) -> Tensor:
    scale = amax / top
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row keeps scale 1


class FP8:
    """FP8 E4M3 with a per-tensor or per-channel (per-row) absolute-max scale."""

    def __init__(self, scale: str = "channel"):
        if scale not in ("tensor", "channel"):
            raise RlxError(f"unknown fp8 scale={scale!r}; valid: tensor, channel")
        self.scale = scale

    def __repr__(self) -> str:
        return f"fp8(scale={self.scale})"

    def encode(self, w: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> Quantized:
        dtype, w = w.dtype, w.detach().float()
        rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
        amax = rows.abs().amax() if self.scale == "tensor" else rows.abs().amax(dim=1, keepdim=True)
        scales = _safe(amax, FP8_MAX)
        y = (rows / scales).clamp(-FP8_MAX, FP8_MAX)
        if rounding == "nearest":
            codes = y.to(torch.float8_e4m3fn)
        else:
            codes = _stochastic_fp8(y, generator)
        return Quantized(codes, scales.reshape(-1).contiguous(), w.shape, dtype)

    def decode(self, q: Quantized) -> Tensor:
        rows = q.codes.float()
        scales = q.scales if self.scale == "channel" else q.scales.expand(rows.shape[0])
        return (rows * scales[:, None]).reshape(q.shape).to(q.dtype)


def _stochastic_fp8(y: Tensor, generator: torch.Generator | None) -> Tensor:
    """Round |y| down or up to its E4M3 neighbours, up with probability (|y| - lo) / (hi - lo)."""
    a = y.abs()
    near = a.to(torch.float8_e4m3fn)
    near_code = near.view(torch.uint8).to(torch.int16)
    lo_code = torch.where(near.float() > a, near_code - 1, near_code).clamp(0, FP8_TOP)
    hi_code = (lo_code + 1).clamp(max=FP8_TOP)
    lo = lo_code.to(torch.uint8).view(torch.float8_e4m3fn).float()
    hi = hi_code.to(torch.uint8).view(torch.float8_e4m3fn).float()
    gap = (hi - lo).clamp(min=torch.finfo(torch.float32).tiny)
    p_up = ((a - lo) / gap).clamp(0, 1)
    up = torch.rand(a.shape, generator=generator, device=a.device) < p_up
    mag = torch.where(up, hi_code, lo_code).to(torch.uint8)
    sign = (y < 0).to(torch.uint8) << 7
    return (mag | sign).view(torch.float8_e4m3fn)


class IntN:
    """Signed symmetric integers in [-2^(b-1), 2^(b-1) - 1] with one absolute-max scale per group
    of `group_size` consecutive weights along each row (`group_size=0`: one group per row).
    4-bit codes are packed two per byte."""

    def __init__(self, bits: int = 4, group_size: int = 32):
        if bits not in (2, 3, 4, 8):
            raise RlxError(f"unsupported integer bits={bits}; valid: 2, 3, 4, 8")
        self.bits, self.group_size = bits, group_size
        self.qmax = 2 ** (bits - 1) - 1

    def __repr__(self) -> str:
        return f"int{self.bits}(group_size={self.group_size})"

    def _groups(self, w: Tensor) -> Tensor:
        rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
        g = self.group_size or rows.shape[1]
        if rows.shape[1] % g:
            raise RlxError(f"{self}: a row of {rows.shape[1]} weights does not split into groups of {g}")
        return rows.reshape(-1, g)

    def encode(self, w: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> Quantized:
        groups = self._groups(w.detach().float())
        scales = _safe(groups.abs().amax(dim=1, keepdim=True), self.qmax)
        ints = _round(groups / scales, rounding, generator).clamp(-self.qmax - 1, self.qmax).to(torch.int16)
        return Quantized(self._pack(ints.reshape(-1)), scales.reshape(-1), w.shape, w.dtype)

    def decode(self, q: Quantized) -> Tensor:
        n = q.shape.numel()
        ints = self._unpack(q.codes, n).float().reshape(q.scales.shape[0], -1)
        return (ints * q.scales[:, None]).reshape(q.shape).to(q.dtype)

    def _pack(self, ints: Tensor) -> Tensor:
        u = (ints + 2 ** (self.bits - 1)).to(torch.uint8)  # offset binary
        if self.bits > 4:
            return u
        if u.numel() % 2:
            u = torch.cat([u, u.new_zeros(1)])
        return u[0::2] | (u[1::2] << 4)

    def _unpack(self, codes: Tensor, n: int) -> Tensor:
        if self.bits > 4:
            u = codes
        else:
            u = torch.stack([codes & 0xF, codes >> 4], dim=1).reshape(-1)[:n]
        return u.to(torch.int16) - 2 ** (self.bits - 1)


class Grid:
    """A fixed uniform grid, multiples of `step` (fixed point; int32 codes): the setting of the ECO
    paper's scalar analysis, where a step smaller than step/2 rounds back to where it started."""

    def __init__(self, step: float):
        if not step > 0:
            raise RlxError(f"grid step must be > 0, got {step}")
        self.step = float(step)

    def __repr__(self) -> str:
        return f"grid(step={self.step})"

    def encode(self, w: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> Quantized:
        ints = _round(w.detach().double() / self.step, rounding, generator).to(torch.int32)
        return Quantized(ints, torch.tensor([self.step]), w.shape, w.dtype)

    def decode(self, q: Quantized) -> Tensor:
        return (q.codes.double() * self.step).reshape(q.shape).to(q.dtype)


class Identity:
    """No quantization (fp32 codes): the limiting case in which every quantizer is a no-op."""

    def __repr__(self) -> str:
        return "identity"

    def encode(self, w: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> Quantized:
        return Quantized(w.detach().clone(), torch.ones(1), w.shape, w.dtype)

    def decode(self, q: Quantized) -> Tensor:
        return q.codes.clone()


def make_format(kind: str, scale: str = "channel", bits: int = 4, group_size: int = 32, step: float = 0.05):
    """The format named in a quantizer config: fp8 | int (bits, group_size) | grid (step) | identity."""
    if kind == "fp8":
        return FP8(scale)
    if kind == "int":
        return IntN(bits, group_size)
    if kind == "grid":
        return Grid(step)
    if kind == "identity":
        return Identity()
    raise RlxError(f"unknown weight format {kind!r}; valid: fp8, int, grid, identity")


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise RlxError(f"unknown rounding={rounding!r}; valid: {', '.join(ROUNDINGS)}")
    return rounding
