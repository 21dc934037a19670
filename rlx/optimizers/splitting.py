"""Gradient splitting: AdamW inside a subspace of each projectable matrix, a state-free update
along the rest (FRUGAL, Zmushko et al., ICML 2025). GaLore and Fira are members of the family:

    optimizer=frugal   projector=block   state_free=signsgd  reset_on_refresh=true   (FRUGAL's defaults)
    optimizer=galore   projector=svd     state_free=none     scale=0.25              (GaLore)
    optimizer=fira     projector=svd     state_free=fira     scale=0.25              (Fira)

Per step, for a projectable matrix W with gradient G and a projector P refreshed from the current
G every `update_gap` steps (rlx/optimizers/projectors.py):

    W ← W (1 − η λ)                                   decoupled weight decay, on every parameter
    R = P(G);  m, v ← Adam moments of R               state-full, in the subspace
    W ← W − η · scale · Pᵀ(m̂ / (√v̂ + ε))
    W ← W − η · state_free_lr_scale · rule(G − Pᵀ P(G))

with rule = sign (signSGD), identity (SGD), 0 (`none`: GaLore, BAdam) or Fira's norm-matched
scaling with its growth limiter (rlx/optimizers/fira.py). Parameters the rule in
`rlx.layers.split_named` does not call projectable (embeddings, norms, LM head, biases)
get plain AdamW. Choices the papers leave to the code:

* The state-free step is η·state_free_lr_scale and does not include `scale`: Fira leaves its
  residual unscaled, and at FRUGAL's default scale = 1 the two conventions agree.
* `reset_on_refresh` zeroes the subspace moments and Adam's step count (bias correction starts
  again, as for a fresh Adam); without it the moments carry over into the new basis (GaLore, Fira).
  Block selection always drops the state of a tensor that leaves the active set (BAdam).
* Fira's residual is the paper's G − P R. The authors' code (the `fira` package, FiraAdamW, whose
  `project_back` multiplies by α) forms G − α P R, which at α = 0.25 keeps 75% of the in-subspace
  gradient in the residual; `fira_residual=code` reproduces that form (with α = `scale`), the
  default `paper` the equation. At α = 1 the two agree.
* Fira's growth limiter compares residual norms before Adam's bias correction √(1−β2^t)/(1−β1^t)
  (the paper does not say; its code does), so the correction's own drift never trips it.
* Random choices (bases, coordinates, blocks) come from generators seeded by (seed, refresh,
  parameter), the parameter by its place among all the optimizer's parameters (over every group,
  so same-shaped matrices in different groups draw different bases), so a resumed run draws the
  same ones; SVD bases are kept in the optimizer state.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rlx.errors import RlxError
from rlx.layers import PROJECTABLE, split_named
from rlx.optimizers.fira import limit_growth, norm_scaling
from rlx.optimizers.projectors import (
    COORD_KINDS,
    KINDS,
    MATRIX_KINDS,
    Coordinates,
    Empty,
    Full,
    Subspace,
    block_selection,
    subspace_size,
)

STATE_FREE = ("signsgd", "sgd", "none", "fira")
BLOCK_ORDERS = ("random", "ascending", "descending")
FIRA_RESIDUALS = ("paper", "code")  # G − P R (Fira's paper), G − scale·P R (its code, the `fira` package)


def adam_direction(state: dict, g: Tensor, betas: tuple[float, float], eps: float) -> Tensor:
    """Update Adam's moments of `g` in `state` and return m̂ / (√v̂ + ε) (torch AdamW's arithmetic)."""
    if "exp_avg" not in state:
        state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(g), torch.zeros_like(g)
    beta1, beta2 = betas
    state["step"] += 1
    state["exp_avg"].lerp_(g, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(eps)
    return state["exp_avg"] / denom / bias1


def drop_moments(state: dict) -> None:
    for key in ("step", "exp_avg", "exp_avg_sq"):
        state.pop(key, None)


def _seeded(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(keys) & 0x7FFF_FFFF_FFFF)


class GradientSplitting(torch.optim.Optimizer):
    """FRUGAL / GaLore / Fira. `params` must be named (`model.named_parameters()`, as rlx passes them)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        projector: str = "block",
        density: float = 0.25,
        rank: int | None = None,
        update_gap: int = 200,
        state_free: str = "signsgd",
        state_free_lr_scale: float = 1.0,
        scale: float = 1.0,
        reset_on_refresh: bool = True,
        block_order: str = "random",
        fira_gamma: float = 1.01,
        fira_residual: str = "paper",
        projectable: str = PROJECTABLE,
        seed: int = 0,
    ):
        if projector not in KINDS:
            raise ValueError(f"projector={projector!r}; valid: {', '.join(KINDS)}")
        if state_free not in STATE_FREE:
            raise ValueError(f"state_free={state_free!r}; valid: {', '.join(STATE_FREE)}")
        if block_order not in BLOCK_ORDERS:
            raise ValueError(f"block_order={block_order!r}; valid: {', '.join(BLOCK_ORDERS)}")
        if fira_residual not in FIRA_RESIDUALS:
            raise RlxError(f"fira_residual={fira_residual!r}; valid: {', '.join(FIRA_RESIDUALS)}")
        if not 0.0 <= density <= 1.0 or update_gap < 1 or (rank is not None and rank < 0):
            raise ValueError("need 0 <= density <= 1, update_gap >= 1 and rank >= 0")
        if state_free == "fira" and (projector == "block" or (density == 0 and not rank)):
            raise ValueError("Fira scales the residual by the subspace's Adam step: it needs a subspace "
                             "(density > 0 or rank >= 1) and a projector other than block")
        self.projector, self.density, self.rank, self.update_gap = projector, density, rank, update_gap
        self.state_free, self.state_free_lr_scale, self.scale = state_free, state_free_lr_scale, scale
        self.reset_on_refresh, self.block_order, self.fira_gamma, self.seed = reset_on_refresh, block_order, fira_gamma, seed
        self.fira_residual = fira_residual
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(_split_groups(params, projectable), defaults)
        if state_free == "fira":
            self._check_fira_subspaces()
        self._active: set[int] | None = None  # block selection: ids of the active tensors (derived, not saved)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.projector == "block":
            t = self.param_groups[0].get("t", 0)
            if t % self.update_gap == 0:
                self._select_blocks(t // self.update_gap, start_afresh=True)
            elif self._active is None:  # resumed mid-period: the same blocks, their moments kept
                self._select_blocks(t // self.update_gap, start_afresh=False)
        index = 0  # each parameter's place over all groups: its random choices' seed, unique per parameter
        for group in self.param_groups:
            t = group.setdefault("t", 0)  # steps taken; a group key, so checkpoints carry it
            refresh = t % self.update_gap == 0
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                lr = group["lr"]
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                state = self.state[p]
                if group["kind"] == "regular":
                    p.add_(adam_direction(state, p.grad, group["betas"], group["eps"]), alpha=-lr)
                else:
                    self._split_step(p, state, group, refresh, (self.seed, t // self.update_gap, index))
            group["t"] = t + 1
        return loss

    def _split_step(self, p: Tensor, state: dict, group: dict, refresh: bool, key: tuple) -> None:
        g = p.grad
        proj = self._projector(p, state, refresh, key)
        psi = r = None
        if not isinstance(proj, Empty):
            r = proj.down(g)
            if r.numel():
                psi = adam_direction(state, r, group["betas"], group["eps"])
                p.add_(proj.up(psi, g), alpha=-group["lr"] * self.scale)
        if self.state_free == "none" or isinstance(proj, Full):
            return
        residual = proj.residual(g)
        if self.state_free == "fira" and self.fira_residual == "code":
            residual.add_(proj.up(r, g), alpha=1 - self.scale)  # G − scale·P R: the fira package's form
        if self.state_free == "signsgd":
            update = residual.sign_()
        elif self.state_free == "sgd":
            update = residual
        else:  # fira; the limiter compares norms before Adam's bias correction, as Fira's code does
            beta1, beta2 = group["betas"]
            bias = math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
            scaled = norm_scaling(psi, r, proj.axis) * residual / bias
            update, state["fira_norm"] = limit_growth(scaled, state.get("fira_norm"), self.fira_gamma)
            update.mul_(bias)
        p.add_(update, alpha=-group["lr"] * self.state_free_lr_scale)

    def _check_fira_subspaces(self) -> None:
        """Fira scales each residual by its subspace's Adam step, so every projectable matrix needs one."""
        for group in self.param_groups:
            if group["kind"] != "projectable":
                continue
            for name, p in zip(group.get("param_names", ["?"] * len(group["params"])), group["params"]):
                if subspace_size(p.shape, self.projector, self.density, self.rank) == 0:
                    raise RlxError(f"state_free=fira needs a subspace of at least 1 for every matrix: {name} "
                                   f"{tuple(p.shape)} gets none at projector={self.projector}, "
                                   f"rank={self.rank}, density={self.density}")

    # ------------------------------------------------------------------ projectors

    def _projector(self, p: Tensor, state: dict, refresh: bool, key: tuple):
        if self.projector == "block":
            return Full() if id(p) in self._active else Empty()
        kind, g = self.projector, p.grad
        if refresh or not ({"basis", "index"} & state.keys()):
            if self.reset_on_refresh:
                drop_moments(state)
            size = subspace_size(g.shape, kind, self.density, self.rank)
            if kind in MATRIX_KINDS:
                state["basis"] = Subspace.build(g, kind, size, _seeded(*key))
            else:
                state["index"] = Coordinates.build(g.shape, kind, size, _seeded(*key), g.device)
        if kind in MATRIX_KINDS:
            return Subspace(state["basis"], right=g.shape[0] >= g.shape[1])
        assert kind in COORD_KINDS
        return Coordinates(state["index"], Coordinates.axis_of(kind, g.shape))

    def _select_blocks(self, refresh: int, start_afresh: bool) -> None:
        blocks = [p for g in self.param_groups if g["kind"] == "projectable" for p in g["params"]]
        chosen = block_selection(len(blocks), self.density, refresh, self.block_order, _seeded(self.seed, refresh))
        active = {id(blocks[i]) for i in chosen}
        for p in blocks if start_afresh else []:  # BAdam: a tensor leaving the active set drops its state;
            if id(p) not in active or self.reset_on_refresh:  # with reset, every tensor starts afresh
                drop_moments(self.state[p])
        self._active = active


def _split_groups(params, pattern: str) -> list[dict]:
    """Each incoming group split into its regular and projectable parameters (names required)."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for group in groups:
        named = list(group["params"])
        if named and not isinstance(named[0], tuple):
            raise ValueError("gradient splitting needs named parameters: pass model.named_parameters()")
        projectable, regular = split_named(named, pattern)
        for kind, members in (("regular", regular), ("projectable", projectable)):
            if members:
                out.append({**group, "params": members, "kind": kind})
    return out
