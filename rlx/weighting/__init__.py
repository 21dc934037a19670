"""Per-sample loss weightings for algo=sft (the `weighting` config group).

    rlx train weighting=glow data=reasoning_unfiltered     # GLOW (rlx/weighting/glow.py)

A weighting is a callable `w = weighting(losses, ids)`:
    losses  a detached [B] tensor, each sample's mean token cross-entropy over its target tokens
            (the micro-batch's forward pass, before the update);
    ids     a list of B stable sample ids (the examples' "id"), or None when the data has none;
    w       a detached [B] tensor of weights.
SFT then takes `(w * per_sample_loss).mean()` over the micro-batch and counts samples, not tokens,
as the micro-batch's `num_targets`, so gradient accumulation weighs micro-batches by samples.
`weighting=none` (the default, `{}`) leaves SFT's token-mean loss exactly as it is.

A weighting may keep state (a history of losses per id): it returns it from `state_dict()`
and takes it back in `load_state_dict()`; SFT's checkpointed state carries it, so a resumed run
weighs exactly as the straight one. `metrics` (floats, keys namespaced "weight/...") is what the
last call measured; SFT adds it to the step's metrics.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Weighting(Protocol):
    metrics: dict[str, float]

    def __call__(self, losses: Tensor, ids: list | None) -> Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def weight_metrics(w: Tensor) -> dict[str, float]:
    """The weights' mean, min and max (what every weighting reports)."""
    return {"weight/mean": w.mean().item(), "weight/min": w.min().item(), "weight/max": w.max().item()}


class Uniform:
    """Every sample weighs 1: SFT with a per-sample mean instead of a token mean (the limit every
    weighting should reach when it has nothing to say)."""

    def __init__(self):
        self.metrics: dict[str, float] = {}

    def __call__(self, losses: Tensor, ids: list | None) -> Tensor:
        w = torch.ones_like(losses)
        self.metrics = weight_metrics(w)
        return w

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
