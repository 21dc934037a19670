"""Fira's two rules for the gradient outside the low-rank subspace (Chen et al., 2024).

Fira keeps GaLore's low-rank Adam and adds the residual G − P R back to the update, scaled so it
moves as much as Adam would have: per column (or row) of the dimension R shares with G,

    φ_i = ‖ψ(R)_{:,i}‖ / ‖R_{:,i}‖,     S = φ ⊙ (G − P R),

where ψ(R) is Adam's bias-corrected direction m̂/(√v̂ + ε). A norm-growth limiter stops spikes:
if ‖S_t‖ > γ‖S_{t−1}‖ then S_t is rescaled to norm γ‖S_{t−1}‖, and the norm kept for the next
step is the limited one (γ = 1.01 in every experiment of the paper).
"""
from __future__ import annotations

from torch import Tensor

TINY = 1e-8  # keeps φ finite where a column of R is exactly zero (the reference code's choice)


def norm_scaling(psi: Tensor, r: Tensor, axis: int | None) -> Tensor:
    """φ: ‖ψ(R)‖ / ‖R‖ along the compressed `axis` (one factor per shared row or column, kept as a
    broadcastable shape), or one factor for the whole matrix when `axis` is None."""
    if axis is None:
        return psi.norm() / (r.norm() + TINY)
    return psi.norm(dim=axis, keepdim=True) / (r.norm(dim=axis, keepdim=True) + TINY)


def limit_growth(s: Tensor, previous_norm: float | None, gamma: float) -> tuple[Tensor, float]:
    """The norm-growth limiter: (S, the norm to remember). The first call only records ‖S‖."""
    norm = s.norm().item()
    if previous_norm is None or norm <= gamma * previous_norm:
        return s, norm
    factor = gamma * previous_norm / norm
    return s * factor, norm * factor
