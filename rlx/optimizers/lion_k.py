"""Lion-K: Lion with its sign replaced by the gradient of a convex function K.

    rlx train optimizer=lion_k                          # kernel=l1: Lion itself
    rlx train optimizer=lion_k optimizer.kernel=nuclear optimizer.lr=1e-1

Lion (Chen et al., 2023, arXiv 2302.06675) is the member K = ‖·‖₁ of the Lion-K family
(Chen, Liu, Liang & Liu, ICLR 2024, arXiv 2310.05898). Written in Lion's own order, with m
accumulating *negative* gradients and the interpolation using the *old* momentum:

    n_t = β1 m_{t−1} − (1−β1) g_t
    x_t = x_{t−1} + η (∇K(n_t) − λ x_{t−1})
    m_t = β2 m_{t−1} − (1−β2) g_t

The paper shows these dynamics minimize f(x) + K*(λx)/λ: for a norm K, K* is the indicator of
the dual-norm unit ball, so with decoupled weight decay λ > 0 the iterates are driven into
‖x‖_dual ≤ 1/λ (fast phase) and then decrease f inside it (Lyapunov phase). `dual_norm` measures
that norm, so λ·dual_norm(x) ≤ 1 (approached from above or already held) is a cheap check.

Kernels, as pure functions of one tensor (`KERNELS`):
- `l1`: ∇K = sign(x). Lion; the constraint is ‖x‖_∞ ≤ 1/λ. sign(0) = 0, as in torch.
- `l2`: ∇K = x/‖x‖₂ over the whole tensor (0 at x = 0): normalized momentum; ‖x‖₂ ≤ 1/λ.
- `nuclear`: ∇K = U Vᵀ from the SVD of the 2-D tensor (its orthogonal polar factor, the
  update of Muon, as the authors' note "Muon is a Nuclear Lion King" points out); the
  constraint is on the spectral norm, σ_max(x) ≤ 1/λ. Directions with a zero singular value
  get no step (U_r V_rᵀ over the nonzero ones, still a subgradient), so a zero momentum gives
  a zero update. rlx's choices for other shapes: a tensor with more than two dimensions is
  read as a matrix of shape[0] rows (as Muon does for convolutions); a vector (bias, norm
  weight) is read as a 1×n matrix, whose nuclear norm is its l2 norm, so it gets the `l2`
  kernel. The update then has entry RMS 1/√max(rows, cols) for every shape.
- `quadratic`: K = ½‖x‖₂², ∇K = x: momentum SGD in Nesterov form with decoupled weight decay.
  K* = ½‖·‖² is finite everywhere, so λ acts as an L2 penalty (λ/2)‖x‖², not a constraint.

Departures and open choices:
- The momentum buffer is stored as Lion and bitsandbytes store it, `exp_avg` = EMA of +g
  (so Lion-K's m is −exp_avg); the update is the same, and kernel=l1 matches
  `bitsandbytes.optim.Lion` step for step.
- No rescaling of ∇K: the step's size depends on the kernel (|sign| = 1 per entry, ‖x/‖x‖‖ = 1
  per tensor, σ(UVᵀ) = 1), so each kernel needs its own LR (conf/optimizer/lion_k.yaml).
- The nuclear kernel computes a full SVD in float32 (exact, cubic in the smaller side), not
  Muon's Newton–Schulz approximation: fine for rlx's model sizes.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


def l1_grad(x: Tensor) -> Tensor:
    """∇‖x‖₁ = sign(x), with sign(0) = 0."""
    return torch.sign(x)


def l2_grad(x: Tensor) -> Tensor:
    """∇‖x‖₂ = x/‖x‖₂ over the whole tensor; 0 where x = 0 (0 is a subgradient there)."""
    return x / torch.linalg.vector_norm(x).clamp_min(torch.finfo(x.dtype).tiny)


def nuclear_grad(x: Tensor) -> Tensor:
    """∇‖X‖_* = U Vᵀ (the orthogonal polar factor of X), over the nonzero singular values.

    A vector is a 1×n matrix (its nuclear norm is its l2 norm); more than two dimensions are
    flattened to shape[0] rows."""
    if x.ndim < 2:
        return l2_grad(x)
    m = x.reshape(x.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    # the rank cut-off of torch.linalg.matrix_rank: below it a singular value is rounding noise
    keep = s > s.max() * max(m.shape) * torch.finfo(s.dtype).eps
    return ((u * keep) @ vh).reshape(x.shape).to(x.dtype)


def quadratic_grad(x: Tensor) -> Tensor:
    """∇(½‖x‖₂²) = x."""
    return x


KERNELS: dict[str, Callable[[Tensor], Tensor]] = {
    "l1": l1_grad,
    "l2": l2_grad,
    "nuclear": nuclear_grad,
    "quadratic": quadratic_grad,
}


def dual_norm(x: Tensor, kernel: str) -> float:
    """The norm that Lion-K with weight decay λ bounds by 1/λ: the dual of K (for `quadratic`,
    which sets no bound, the l2 norm). l1 → max |x|, l2 → ‖x‖₂, nuclear → σ_max (a vector as 1×n)."""
    if kernel == "l1":
        return x.abs().max().item()
    if kernel == "nuclear" and x.ndim >= 2:
        return torch.linalg.matrix_norm(x.reshape(x.shape[0], -1).float(), ord=2).item()
    return torch.linalg.vector_norm(x.float()).item()


class LionK(torch.optim.Optimizer):
    """Lion-K (module docstring): one momentum buffer per parameter; `kernel` picks ∇K."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, kernel: str = "l1"):
        if kernel not in KERNELS:
            raise ValueError(f"unknown Lion-K kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {lr} and {weight_decay}")
        beta1, beta2 = betas
        if not (0.0 <= beta1 <= 1.0 and 0.0 <= beta2 <= 1.0):
            raise ValueError(f"betas must lie in [0, 1], got {tuple(betas)}")
        super().__init__(params, dict(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, kernel=kernel))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, grad_k = group["lr"], group["weight_decay"], KERNELS[group["kernel"]]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LionK does not support sparse gradients")
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]  # = −m in the equations above
                n = (exp_avg * beta1).add_(g, alpha=1 - beta1).neg_()  # n_t = β1 m_{t−1} − (1−β1) g_t
                p.mul_(1 - lr * wd).add_(grad_k(n), alpha=lr)  # x_t = x_{t−1}(1 − ηλ) + η ∇K(n_t)
                exp_avg.mul_(beta2).add_(g, alpha=1 - beta2)  # m_t = β2 m_{t−1} − (1−β2) g_t
        return loss
