"""TRP: Trained Rank Pruning. Periodic truncated-SVD substitution of the weights, a nuclear-norm
subgradient, and at the end an export of each layer as two thin factors.

Xu et al., "Trained Rank Pruning for Efficient Deep Neural Networks", arXiv 1812.02402, and
"TRP: Trained Rank Pruning for Efficient Deep Neural Networks", IJCAI 2020, arXiv 2004.14566.

    rlx train hooks=trp
    rlx train hooks=trp hooks.trp.period=20 hooks.trp.energy=0.95 hooks.trp.nuclear_weight=0

The paper trains CNNs and reshapes each kernel into a matrix (channel-wise or spatial-wise); for a
linear layer the matrix is the weight itself, so there is no reshaping choice here. Targets are
the attention/MLP linear layers (`rlx.layers.TARGETS`); embeddings and the LM head stay dense.

At optimizer steps t = z·period (t = 0, period, 2·period, ...), at the start of the step:

    W = U Σ Vᵀ,   r = min { r : Σ_{i≤r} σ_i² / Σ_i σ_i² ≥ energy }   (`energy_rank`)
    W ← U_r Σ_r V_rᵀ                                                  (`truncate`, same shape, in place)

so that step's forward, backward and update run on the low-rank weights, as in the paper; the
Parameter objects stay the same, so the optimizer keeps its state. The objective is
L + λ Σ_ℓ ‖W_ℓ‖_*, optimised by stochastic subgradient descent: after backward, λ·U Vᵀ is added to
each gradient (`nuclear_subgradient`; U Vᵀ over the non-zero singular values is a subgradient of
the nuclear norm).

Choices the paper leaves to its code:
* The subgradient is taken from the substitution's own SVD, U_r V_rᵀ, which is exact at the
  substituted weights W_r, and it is added on substitution steps only, as the official code does
  (its `batch_idx % period == 0` branch). With the default period of 1 that is every step; with a
  longer period the regularizer acts once per period and no SVD is spent on the other steps.
* The subgradient joins the gradient before clipping (`trainer.max_grad_norm`), so it is clipped
  with it. Weight decay, if any, is the optimizer's.
* Defaults follow the official code: energy 0.9 (its hard-coded `EnergyThreshold(0.9)` during
  training), period 1 (its `--decouple-period` default), λ = 3e-4 (its README's `--nuclear-weight`),
  export threshold 0.05 (its value threshold for channel- and spatial-wise decomposition).
* energy = 1 leaves W exactly as it is (no SVD round-off is written back).

At the end (`export`), each trained weight W (m×n, as y = W x) is factored at the singular-value
threshold τ: keep the r triplets with σ_i ≥ τ, up = U_r Σ_r^½ (m×r), down = Σ_r^½ V_rᵀ (r×n), so
‖W − up·down‖₂ < τ. Written to `<run_dir>/low_rank/`: `factors.safetensors` (`<layer>.up`,
`<layer>.down`) and `low_rank.json` (per-layer ranks, parameters before and after, relative
Frobenius reconstruction error, and totals). Biases stay in the model. Aggregate ranks go to the
hook's `metrics` (logged by the loop) at every substitution and at the export.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlx.errors import RlxError
from rlx.hooks import Hook
from rlx.layers import TARGETS, out_in, target_layers

# ---------------------------------------------------------------------------- pure functions


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r with Σ_{i≤r} σ_i² / Σ_i σ_i² ≥ energy (σ sorted descending); all of them at energy ≥ 1."""
    s2 = singular_values.double() ** 2
    total = s2.sum()
    if energy >= 1 or total == 0:
        return int(singular_values.numel()) if total > 0 else 0
    fractions = s2.cumsum(0) / total
    return min(int((fractions < energy).sum()) + 1, singular_values.numel())


def truncated_svd(W: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, σ_r, V_rᵀ) of W in float32, r = `energy_rank`."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    r = energy_rank(S, energy)
    return U[:, :r], S[:r], Vh[:r]


def truncate(W: torch.Tensor, energy: float) -> torch.Tensor:
    """U_r Σ_r V_rᵀ at the energy rank, in W's dtype; W itself (a copy) when nothing is cut."""
    U, S, Vh = truncated_svd(W, energy)
    if S.numel() == min(W.shape):
        return W.clone()
    return ((U * S) @ Vh).to(W.dtype)


def nuclear_subgradient(W: torch.Tensor) -> torch.Tensor:
    """U Vᵀ over the numerically non-zero singular values: a subgradient of ‖W‖_* (the gradient where W
    has full rank)."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    tol = max(W.shape) * torch.finfo(torch.float32).eps * (S[0].item() if S.numel() else 0.0)  # as matrix_rank
    r = int((S > tol).sum())
    return (U[:, :r] @ Vh[:r]).to(W.dtype)


def factor(W: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up·down = Σ_{σ_i ≥ threshold} σ_i u_i v_iᵀ; Σ split evenly between them."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    r = int((S >= threshold).sum())
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


# ---------------------------------------------------------------------------- the hook


class TRP(Hook):
    def __init__(self, period: int = 1, energy: float = 0.9, nuclear_weight: float = 3e-4,
                 targets: str | None = TARGETS, export_threshold: float = 0.05, export: bool = True):
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise RlxError(f"hooks.trp.period={period!r} must be an integer >= 1")
        if not 0 < energy <= 1:
            raise RlxError(f"hooks.trp.energy={energy!r} must lie in (0, 1]")
        if nuclear_weight < 0 or export_threshold < 0:
            raise RlxError("hooks.trp.nuclear_weight and hooks.trp.export_threshold must be >= 0")
        self.period, self.energy, self.nuclear_weight = period, energy, nuclear_weight
        self.targets = TARGETS if targets is None else targets
        self.export_threshold, self.export = export_threshold, export
        self.layers: dict = {}
        self._subgradients: dict[str, torch.Tensor] = {}  # U_r V_rᵀ of this step's substitution

    # ------------------------------------------------------------------ events

    def on_train_start(self, state) -> None:
        layers = target_layers(state.model, self.targets)
        self.layers = {n: m for n, m in layers.items() if m.weight.requires_grad}
        if not self.layers:
            raise RlxError(f"hooks.trp found no trainable attention/MLP linear layers matching {self.targets!r}")

    def on_step_start(self, state) -> None:
        if state.step % self.period == 0:
            ranks = self.substitute()
            self.metrics.update(_rank_metrics("trp/", ranks, self._full_ranks()))

    def on_after_backward(self, state) -> None:
        for name, sub in self._subgradients.items():
            weight = self.layers[name].weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.add_(sub.to(weight.grad.dtype), alpha=self.nuclear_weight)
        self._subgradients = {}

    def on_train_end(self, state) -> None:
        if self.export and getattr(state, "run_dir", None) is not None:
            self.export_low_rank(state.model, state.run_dir / "low_rank")

    # ------------------------------------------------------------------ pieces

    def _full_ranks(self) -> dict[str, int]:
        return {n: min(m.weight.shape) for n, m in self.layers.items()}

    @torch.no_grad()
    def substitute(self) -> dict[str, int]:
        """W ← U_r Σ_r V_rᵀ for every target, in place; keeps U_r V_rᵀ for the nuclear term. Returns r per layer."""
        ranks = {}
        for name, layer in self.layers.items():
            weight = layer.weight
            U, S, Vh = truncated_svd(weight, self.energy)
            ranks[name] = S.numel()
            if S.numel() < min(weight.shape):
                weight.copy_((U * S) @ Vh)
            if self.nuclear_weight > 0:
                self._subgradients[name] = U @ Vh
        return ranks

    @torch.no_grad()
    def export_low_rank(self, model, out: Path) -> dict:
        """Factor every target at `export_threshold`; write the factors and the report to `out`."""
        factors, layers, errors, norms = {}, {}, [], []
        for name, layer in self.layers.items():
            W = out_in(layer).float()
            up, down = factor(W, self.export_threshold)
            (m, n), r = W.shape, up.shape[1]
            factors[f"{name}.up"], factors[f"{name}.down"] = up.contiguous(), down.contiguous()
            errors.append((W - up @ down).norm().item())
            norms.append(W.norm().item())
            layers[name] = {"shape": [m, n], "rank": r, "full_rank": min(m, n), "params_before": m * n,
                            "params_after": r * (m + n), "relative_error": errors[-1] / max(norms[-1], 1e-30)}
        before = sum(v["params_before"] for v in layers.values())
        after = sum(v["params_after"] for v in layers.values())
        error = (sum(e * e for e in errors) / max(sum(x * x for x in norms), 1e-30)) ** 0.5
        total = sum(p.numel() for p in model.parameters())
        report = {
            "method": "trp", "threshold": self.export_threshold, "energy": self.energy, "period": self.period,
            "layout": "weight (out_features x in_features) ~= up @ down, so y = (x @ down.T) @ up.T + bias",
            "params_before": before, "params_after": after, "relative_error": error,
            "model_params_before": total, "model_params_after": total - before + after, "layers": layers,
        }
        out.mkdir(parents=True, exist_ok=True)
        save_file(factors, out / "factors.safetensors")
        (out / "low_rank.json").write_text(json.dumps(report, indent=2))
        self.metrics.update(_rank_metrics("trp/export_", {n: v["rank"] for n, v in layers.items()}, self._full_ranks()))
        self.metrics.update({"trp/export_params_ratio": after / before, "trp/export_relative_error": error})
        return report


def _rank_metrics(prefix: str, ranks: dict[str, int], full: dict[str, int]) -> dict[str, float]:
    """Mean, min and max rank over the layers, and the kept fraction of their summed full ranks."""
    values = list(ranks.values())
    return {f"{prefix}rank_mean": sum(values) / len(values), f"{prefix}rank_min": float(min(values)),
            f"{prefix}rank_max": float(max(values)), f"{prefix}rank_ratio": sum(values) / sum(full.values())}
