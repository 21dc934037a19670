"""Weight compander: every attention/MLP weight is a nonlinear, element-wise function of a raw parameter.

Cakaj, Mehnert, Yang, "Weight Compander: A Simple Weight Reparameterization for Regularization",
IJCNN 2023, arXiv 2306.16993.

    rlx train model.parameterization=compander
    rlx train 'model.parameterization={name:compander,mu:3,learnable:true}'       # the paper's learned extension
    rlx train 'model.parameterization={name:compander,law:asinh,scale:max}'
    rlx train model.parameterization=compander +hooks.compander._target_=rlx.compander.CompanderExport

Each target layer's weight W is held as a raw parameter V and computed in every forward pass as

    W = f(V) = s · g(V / s; μ)                  element-wise; s a fixed per-layer scale (a buffer)

so the gradient reaches V through f'(V). The paper's two effects need g odd and monotone with
    * compression of large magnitudes: |f(v)| < |v| above the crossover |v| = s (g(1) = 1), so a large
      weight grows only logarithmically in V and no single weight dominates;
    * expansion near zero: f'(0) = g'(0) > 1, so near-zero ("dead") weights move faster than the
      others and the trained weights gather less at zero.

NOT THE PAPER'S EXACT FUNCTION. The paper's f and its default hyperparameters could not be read
here (only its abstract was reachable), so g is a documented compander of that shape:
    * law=mu_law (default), the μ-law of audio companding (ITU-T G.711) on the normalised weight:
          g(x) = sign(x) · ln(1 + μ|x|) / ln(1 + μ),          g'(0) = μ / ln(1 + μ)
          g⁻¹(y) = sign(y) · ((1 + μ)^|y| − 1) / μ
      (G.711 clips x to [−1, 1]; here the log simply continues beyond, which is the compression.)
    * law=asinh, a smooth μ-law-like curve (linear at 0, logarithmic far out):
          g(x) = asinh(μx) / asinh(μ),   g'(0) = μ / asinh(μ),   g⁻¹(y) = sinh(y · asinh(μ)) / μ
Both are the identity as μ → 0; μ = 0 is exactly the plain layer (f(V) = V, the same tensor).

Choices:
* s per layer, fixed at build time from the layer's weight: `scale=rms` (default; the crossover at
  one RMS, so the upper third of a Gaussian layer sits in the compression range) or `scale=max`
  (max |W|: μ-law's peak normalisation, every initial weight in the expansion range).
* μ = 3 by default (f'(0) = 2.16 for mu_law): a moderate gain, chosen without a search (the paper's
  values were not retrievable).
* V starts at f⁻¹(W) (computed in float64), so the model starts as built or loaded: a pretrained
  model is unchanged to float rounding.
* `learnable=true` learns μ per layer (the paper's extension: "learn the hyperparameters"), as
  μ = exp(ρ) so it stays positive; s stays fixed. It needs μ > 0.
* Only the attention/MLP linear layers (`rlx.layers.TARGETS`) are companded, as LOST's; embeddings,
  norms and the LM head stay plain. The paper reparameterizes every weight of its CNNs.
* mu_law's gradient is written out (`_MuLaw`), since autograd's d|x|/dx = 0 at x = 0 would freeze
  weights that are exactly zero (pruned ones), the weights the method means to revive.

Checkpoints hold V (`...q_proj.parametrizations.weight.original`), s and ρ, so a run resumes exactly;
they reload through rlx (a model built with the same `model.parameterization`). `merge(model)` writes
f(V) into plain weights in place, and `export_plain(model, tokenizer, out)` (what the
`CompanderExport` hook does at the end of a run, into `<run>/plain/`) saves a copy that plain
transformers loads.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from rlx.errors import RlxError
from rlx.hooks import Hook
from rlx.layers import TARGETS, target_layers

LAWS = ("mu_law", "asinh")
SCALES = ("rms", "max")

# ---------------------------------------------------------------------------- the laws (pure functions)


class _MuLaw(torch.autograd.Function):
    """g(x; μ) = sign(x) ln(1 + μ|x|) / ln(1 + μ), with its exact derivatives in x and μ."""

    @staticmethod
    def forward(ctx, x: Tensor, mu: Tensor) -> Tensor:
        ctx.save_for_backward(x, mu)
        return torch.sign(x) * torch.log1p(mu * x.abs()) / torch.log1p(mu)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, mu = ctx.saved_tensors
        L, a = torch.log1p(mu), x.abs()
        dx = mu / ((1 + mu * a) * L)  # = g'(0) = μ / ln(1 + μ) at x = 0, also for x exactly 0
        dmu = None
        if ctx.needs_input_grad[1]:
            dmu = (torch.sign(x) * (a / ((1 + mu * a) * L) - torch.log1p(mu * a) / (L * L * (1 + mu))) * grad).sum()
            dmu = dmu.reshape(mu.shape)
        return grad * dx, dmu


def compand(v: Tensor, mu: Tensor | float, scale: Tensor | float, law: str = "mu_law") -> Tensor:
    """f(v) = s · g(v / s; μ); μ = 0 (a number) returns v itself."""
    if not isinstance(mu, Tensor) and mu == 0:
        return v
    mu = torch.as_tensor(mu, dtype=v.dtype, device=v.device)
    x = v / scale
    if law == "mu_law":
        return scale * _MuLaw.apply(x, mu)
    if law == "asinh":
        return scale * torch.asinh(mu * x) / torch.asinh(mu)
    raise RlxError(f"unknown compander law={law!r}; valid: {', '.join(LAWS)}")


def expand(w: Tensor, mu: Tensor | float, scale: Tensor | float, law: str = "mu_law") -> Tensor:
    """f⁻¹(w), the raw parameter whose companded value is w; μ = 0 returns w itself."""
    if not isinstance(mu, Tensor) and mu == 0:
        return w
    mu = torch.as_tensor(mu, dtype=w.dtype, device=w.device)
    y = w / scale
    if law == "mu_law":
        return scale * torch.sign(y) * torch.expm1(y.abs() * torch.log1p(mu)) / mu
    if law == "asinh":
        return scale * torch.sinh(y * torch.asinh(mu)) / mu
    raise RlxError(f"unknown compander law={law!r}; valid: {', '.join(LAWS)}")


def layer_scale(w: Tensor, how: str = "rms") -> float:
    """s: the RMS of the weight's entries (`rms`) or their largest magnitude (`max`); 1 for an all-zero weight."""
    w = w.detach().double()
    s = w.pow(2).mean().sqrt().item() if how == "rms" else w.abs().max().item()
    return s if s > 0 else 1.0


# ---------------------------------------------------------------------------- the parametrization


class Compander(nn.Module):
    """The parametrization W = f(V) of one layer (torch.nn.utils.parametrize). `right_inverse` is f⁻¹,
    so registering it on a layer sets V = f⁻¹(W) and leaves the layer's output as it was."""

    def __init__(self, mu: float, scale: float, law: str = "mu_law", learnable: bool = False):
        super().__init__()
        self.law, self.learnable = law, learnable
        self.register_buffer("scale", torch.tensor(float(scale)))
        if learnable:  # μ = exp(ρ) > 0 whatever the optimizer does to ρ
            self.log_mu = nn.Parameter(torch.tensor(math.log(mu)))
        else:
            self.mu = float(mu)

    def current_mu(self) -> Tensor | float:
        return self.log_mu.exp() if self.learnable else self.mu

    def forward(self, v: Tensor) -> Tensor:
        return compand(v, self.current_mu(), self.scale.to(v.dtype), self.law)

    @torch.no_grad()
    def right_inverse(self, w: Tensor) -> Tensor:
        mu = self.current_mu()
        mu = mu.double() if isinstance(mu, Tensor) else mu
        if not isinstance(mu, Tensor) and mu == 0:
            return w
        return expand(w.double(), mu, self.scale.double(), self.law).to(w.dtype)

    def extra_repr(self) -> str:
        mu = self.current_mu()
        mu = mu.item() if isinstance(mu, Tensor) else mu
        return f"law={self.law}, mu={mu:.4g}, scale={self.scale.item():.4g}, learnable={self.learnable}"


def _check(mu, law, scale, learnable) -> None:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
        raise RlxError(f"compander mu={mu!r} must be a number >= 0 (0: the plain layer)")
    if learnable and mu == 0:
        raise RlxError("compander learnable=true learns mu = exp(rho) > 0: give mu > 0")
    if law not in LAWS:
        raise RlxError(f"unknown compander law={law!r}; valid: {', '.join(LAWS)}")
    if scale not in SCALES:
        raise RlxError(f"unknown compander scale={scale!r}; valid: {', '.join(SCALES)}")


def apply_compander(model: nn.Module, mu: float = 3.0, law: str = "mu_law", scale: str = "rms",
                    learnable: bool = False, targets: str | None = TARGETS) -> dict[str, Compander]:
    """Parametrize every attention/MLP linear weight of `model` as W = f(V), in place (V = f⁻¹(W)).
    Returns the parametrizations by layer name. See the module docstring for the options."""
    _check(mu, law, scale, learnable)
    targets = TARGETS if targets is None else targets
    if hasattr(model, "peft_config"):
        raise RlxError("the compander reparameterizes the weights LoRA adapts: use model.parameterization or "
                       "model.lora, not both")
    layers = target_layers(model, targets)
    if not layers:
        raise RlxError(f"the compander found no attention/MLP linear layers matching {targets!r}")
    out = {}
    for name, module in layers.items():
        if parametrize.is_parametrized(module, "weight"):
            raise RlxError(f"{name}.weight is already parametrized")
        out[name] = Compander(mu, layer_scale(module.weight, scale), law, learnable)
        parametrize.register_parametrization(module, "weight", out[name])
    return out


# ---------------------------------------------------------------------------- merge and export


def companded(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of `model` whose weight is companded, by name."""
    return {name: m for name, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, Compander) for p in m.parametrizations["weight"])}


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Write f(V) into each companded layer as a plain `weight` and drop the parametrization (in place)."""
    for module in companded(model).values():
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict a plain model of the same architecture has: `<layer>.weight` = f(V), and no V, s or ρ."""
    layers = companded(model)
    state = {k: v for k, v in model.state_dict().items()
             if not any(k.startswith(f"{name}.parametrizations.") for name in layers)}
    for name, module in layers.items():
        state[f"{name}.weight"] = module.weight.detach().clone()
    return state


def export_plain(model: nn.Module, tokenizer, out: Path) -> Path:
    """Save `model` with its companded weights merged (transformers loads it without rlx); `model` stays as it is."""
    out = Path(out)
    model.save_pretrained(out, state_dict=plain_state_dict(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------- weight statistics and the export hook


@torch.no_grad()
def weight_stats(model: nn.Module, targets: str | None = TARGETS, near: float = 0.1) -> dict[str, float]:
    """What the paper looks at in the trained weights, over the attention/MLP layers (their effective
    weights f(V) where companded): the share of entries with |w| < `near` · RMS of their layer (a
    Gaussian layer: 8.0%), the largest |w|, and the mean over layers of max |w| / RMS."""
    near_count, total, peak, ratios = 0, 0, 0.0, []
    for module in target_layers(model, targets).values():
        w = module.weight.detach().float()
        rms = w.pow(2).mean().sqrt().clamp_min(1e-30)
        near_count += int((w.abs() < near * rms).sum())
        total += w.numel()
        peak = max(peak, w.abs().max().item())
        ratios.append((w.abs().max() / rms).item())
    stats = {"weights/near_zero_share": near_count / max(total, 1), "weights/max_abs": peak,
             "weights/max_over_rms": sum(ratios) / max(len(ratios), 1)}
    mus = [p.current_mu() for m in companded(model).values() for p in m.parametrizations["weight"]
           if isinstance(p, Compander)]
    if mus:
        stats["compander/mu_mean"] = sum(float(m) for m in mus) / len(mus)
    return stats


class CompanderExport(Hook):
    """At the end of a run: the weight statistics (`weight_stats`) as metrics, for any model, and for a
    companded one its merged copy in `<run_dir>/plain/` (`export=false`: statistics only)."""

    def __init__(self, export: bool = True, near: float = 0.1):
        self.export, self.near = export, near

    def on_train_end(self, state) -> None:
        self.metrics.update(weight_stats(state.model, near=self.near))
        if self.export and companded(state.model) and getattr(state, "run_dir", None) is not None:
            export_plain(state.model, state.tokenizer, state.run_dir / "plain")
