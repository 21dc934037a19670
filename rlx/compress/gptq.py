"""Post-training quantization of one linear layer: round-to-nearest and GPTQ.

GPTQ (Frantar et al., 2023) quantizes the columns of W (out × in) one at a time and moves each
column's rounding error onto the columns not yet quantized, so that the layer's output on the
calibration inputs X changes as little as possible. With H = X Xᵀ (in × in, the Hessian of
‖W X − Q X‖² up to a factor 2) and U the upper Cholesky factor of H⁻¹:

    q_j = quant(w_j);   e_j = (w_j − q_j) / U_jj;   w_k ← w_k − e_j U_jk   for k > j

done in blocks of `block_size` columns whose updates to the later columns are applied at once
(lazy batch updates). `damp` adds damp · mean(diag H) to the diagonal before the inversion;
inputs that never fire (H_jj = 0) get H_jj = 1 and their weights are zeroed, as the reference
code does; `act_order` visits columns by decreasing H_jj.

`bits` may be one number or one per input column (BAQ allocates them per column). The grid is
affine per output row (asymmetric: a scale and a zero point; symmetric: zero point in the middle),
over the whole row or over groups of `group_size` columns. Its parameters come from the weights
as they stand when the row (or group) is reached, as in GPTQ. With H = I nothing is propagated
and GPTQ is round-to-nearest exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Grid:
    """Per-row affine grid: q = clamp(round(w / scale) + zero, 0, maxq), w ≈ scale · (q − zero)."""

    scale: Tensor  # (rows,)
    zero: Tensor  # (rows,)
    maxq: int

    @classmethod
    def fit(cls, w: Tensor, bits: int, symmetric: bool = False) -> Grid:
        """The grid that spans each row of `w` (and zero), at `bits` bits."""
        maxq = 2**bits - 1
        lo = w.min(dim=1).values.clamp(max=0)
        hi = w.max(dim=1).values.clamp(min=0)
        if symmetric:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        empty = (lo == 0) & (hi == 0)  # an all-zero row: any grid represents it exactly
        lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
        scale = (hi - lo) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-lo / scale)
        return cls(scale, zero, maxq)

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (self.scale, self.zero) if x.ndim == 1 else (self.scale[:, None], self.zero[:, None])

    def encode(self, x: Tensor) -> Tensor:
        """The integer codes (as floats) of a column (one value per row) or a block of columns."""
        scale, zero = self._params(x)
        return torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)

    def __call__(self, x: Tensor) -> Tensor:
        """Quantize and dequantize a column or a block of columns."""
        scale, zero = self._params(x)
        return scale * (self.encode(x) - zero)


@dataclass
class Codes:
    """A quantized layer as integers: column j decodes as scale[:, g] · (codes[:, j] − zero[:, g])
    with g = grid[j], the grid (one scale and zero point per row) that column was rounded on."""

    codes: Tensor  # (rows, columns), 0 .. 2^bits − 1
    scale: Tensor  # (rows, grids)
    zero: Tensor  # (rows, grids)
    grid: Tensor  # (columns,)
    bits: Tensor  # (columns,)

    def decode(self) -> Tensor:
        return self.scale[:, self.grid] * (self.codes.float() - self.zero[:, self.grid])

    def compact(self) -> dict[str, Tensor]:
        """The tensors to store: codes in the narrowest integer type that holds them."""
        dtype = torch.uint8 if int(self.bits.max()) <= 8 else torch.int32
        return {"codes": self.codes.to(dtype), "scale": self.scale.float(), "zero": self.zero.float(),
                "grid": self.grid.to(torch.int32), "bits": self.bits.to(torch.uint8)}


def column_bits(bits, columns: int) -> Tensor:
    """`bits` as one integer per input column (1..16)."""
    b = torch.as_tensor(bits, dtype=torch.long)
    b = b.expand(columns) if b.ndim == 0 else b
    if b.shape != (columns,):
        raise ValueError(f"bits: one number or one per input column ({columns}), got shape {tuple(b.shape)}")
    if (b < 1).any() or (b > 16).any():
        raise ValueError("bits must lie in 1..16")
    return b


def rtn(w: Tensor, bits: int, group_size: int = 0, symmetric: bool = False) -> Codes:
    """Round-to-nearest on the per-row (or per-group) grid: the floor every method must beat."""
    w = w.float()
    step = group_size if group_size > 0 else w.shape[1]
    grids = [Grid.fit(w[:, s:s + step], bits, symmetric) for s in range(0, w.shape[1], step)]
    codes = torch.cat([g.encode(w[:, i * step:(i + 1) * step]) for i, g in enumerate(grids)], dim=1)
    return Codes(codes, torch.stack([g.scale for g in grids], 1), torch.stack([g.zero for g in grids], 1),
                 torch.arange(w.shape[1]) // step, torch.full((w.shape[1],), bits))


def gptq(w: Tensor, h: Tensor, bits, group_size: int = 0, symmetric: bool = False, damp: float = 0.01,
         act_order: bool = False, block_size: int = 128) -> Codes:
    """GPTQ of `w` (out × in) given H = Σ x xᵀ over the calibration inputs (in × in); returns the
    codes, in `w`'s column order (`.decode()` gives the weights)."""
    w, h = w.float().clone(), h.float().clone()
    columns = w.shape[1]
    col_bits = column_bits(bits, columns)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(columns)
    w, h, col_bits = w[:, order], h[order][:, order], col_bits[order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(columns)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    # Without groups each row's grid spans the row as it was; with groups, the group's columns as
    # they stand when it is reached (columns inside the current block: as the block began, as GPTQ does).
    grids: dict[int, int] = {}  # bits -> index into `made`, for the current group
    made: list[Grid] = []
    source = w.clone()
    codes, grid_of = torch.zeros_like(w), torch.zeros(columns, dtype=torch.long)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block, errors = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1)
        for i in range(i2 - i1):
            j, b = i1 + i, int(col_bits[i1 + i])
            if group_size > 0 and j % group_size == 0:
                grids, source = {}, w[:, j:j + group_size].clone()
            if b not in grids:
                grids[b] = len(made)
                made.append(Grid.fit(source, b, symmetric))
            grid = made[grids[b]]
            codes[:, j], grid_of[j] = grid.encode(block[:, i]), grids[b]
            err = (block[:, i] - grid.scale * (codes[:, j] - grid.zero)) / u[j, j]
            block[:, i:] -= err.unsqueeze(1) * u[j, j:i2].unsqueeze(0)
            errors[:, i] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    back = torch.argsort(order)
    return Codes(codes[:, back], torch.stack([g.scale for g in made], 1), torch.stack([g.zero for g in made], 1),
                 grid_of[back], col_bits[back])
