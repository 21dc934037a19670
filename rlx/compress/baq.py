"""BAQ's bit allocation (Zhang et al., 2025): per-column bit-widths for GPTQ under an average budget.

GPTQ charges column j of a layer the loss (w_j − q_j)² / d_j², where d_j is the j-th diagonal entry
of the upper Cholesky factor of H⁻¹ (rlx/compress/gptq.py). A uniform quantizer at R bits leaves an
error variance ∝ 2^{−2R}, so the layer's loss is about

    L(R) = Σ_j c_j 2^{−2 R_j},   c_j ∝ 1 / d_j²   (the row ranges are shared by every column),

convex in R. Minimising it subject to Σ_j R_j = n·R̄ gives the equal-loss structure
c_j 2^{−2 R_j} = λ for every column: R_j = ½ log2(c_j / λ), i.e. R_j = R̄ + ½ log2(c_j / geomean(c)).
rlx clamps R_j to [min_bits, max_bits] and finds λ by bisection so the clamped mean meets R̄
(reverse water-filling; the reference code sets λ by a heuristic tuned for about 2 bits instead),
then rounds to integers by largest remainder so the total never exceeds the budget.

Columns at 0 bits (the paper replaces them by a constant) are not offered: `min_bits` is at least 1.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def allocate(c: Tensor, avg_bits: float, min_bits: float = 1.0, max_bits: float = 8.0) -> Tensor:
    """Continuous bit-widths minimising Σ c_j 2^{−2 R_j} with mean(R) = avg_bits, R in [min_bits, max_bits]."""
    if not min_bits <= avg_bits <= max_bits:
        raise ValueError(f"average bits {avg_bits} outside [{min_bits}, {max_bits}]")
    log_c = torch.log2(c.double())

    def bits_at(log_lambda: float) -> Tensor:
        return (0.5 * (log_c - log_lambda)).clamp(min_bits, max_bits)

    lo, hi = float(log_c.min()) - 2 * max_bits - 1, float(log_c.max()) - 2 * min_bits + 1  # all max, all min
    for _ in range(200):  # mean bits falls as log λ rises
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bits_at(mid).mean() > avg_bits else (lo, mid)
    return bits_at((lo + hi) / 2).to(c.dtype)


def round_to_budget(bits: Tensor, avg_bits: float) -> Tensor:
    """Integer bit-widths: floors, then +1 for the largest fractional parts while the total stays
    within floor(n · avg_bits)."""
    floors = torch.floor(bits + 1e-9).long()
    spare = math.floor(len(bits) * avg_bits + 1e-9) - int(floors.sum())
    out = floors.clone()
    if spare > 0:
        out[torch.argsort(bits - floors, descending=True, stable=True)[:spare]] += 1
    return out


def column_sensitivity(h: Tensor, damp: float = 0.01) -> Tensor:
    """c_j = 1 / d_j² from the damped Hessian, d = diag(chol_upper(H⁻¹)) (as GPTQ computes it)."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return (1 / torch.diag(u) ** 2).float()


def baq_bits(h: Tensor, avg_bits: float, min_bits: int = 1, max_bits: int = 8, damp: float = 0.01) -> Tensor:
    """Per-column integer bit-widths for a layer with Hessian `h` at an average of `avg_bits`."""
    continuous = allocate(column_sensitivity(h, damp), avg_bits, min_bits, max_bits)
    return round_to_budget(continuous, avg_bits)
