"""Unstructured and N:M pruning of the attention/MLP linear layers (`rlx prune`).

* `magnitude`: drop the weights of smallest |W_ij| across the layer.
* `wanda` (Sun et al., 2024): score |W_ij| · ‖X_j‖ (the input feature's norm over the calibration
  tokens, √H_jj) and drop the lowest within each output row, the comparison group the paper uses.
* `dpruner` (`rlx/compress/dpruner.py`): scores every layer from the whole model first (general
  importance on an open-domain set, then a regularized domain fine-tune), then drops the lowest
  score within each layer.

`n_m=[2,4]` keeps the N highest scores in every group of M consecutive input columns of a row
(2:4, the pattern sparse tensor cores run) instead of a plain share. The requested sparsity is met
exactly where it divides the count: round(s · n) weights per layer (magnitude) or per row (wanda).
"""
from __future__ import annotations

import torch
from torch import Tensor


def keep_mask(score: Tensor, sparsity: float, per_row: bool, n_m: tuple[int, int] | None = None) -> Tensor:
    """True where a weight stays: the lowest `sparsity` share of `score` goes (per row, per layer,
    or N of every M)."""
    if n_m is not None:
        n, m = n_m
        rows, cols = score.shape
        if cols % m or not 0 < n <= m:
            raise ValueError(f"n_m={list(n_m)}: need 0 < N <= M and M dividing the {cols} input columns")
        groups = score.reshape(rows, cols // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.reshape(rows, cols)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must lie in [0, 1)")
    flat = score if per_row else score.reshape(1, -1)
    k = round(sparsity * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep.scatter_(1, flat.topk(k, dim=1, largest=False).indices, False)
    return keep.reshape(score.shape)


# A prune method is called per layer, `method(w, h, sparsity, n_m) -> keep mask`, after
# `method.scores(model, general, domain, progress)` gave it the chance to score the whole model first:
# a dict of scores by layer name (D-Pruner), or None for a method that scores layer by layer.


class Magnitude:
    def scores(self, model, general, domain, progress=True) -> None:
        return None  # scored per layer from |W|

    def __call__(self, w: Tensor, h: Tensor, sparsity: float, n_m=None) -> Tensor:
        return keep_mask(w.abs(), sparsity, per_row=False, n_m=n_m)


class Wanda:
    def scores(self, model, general, domain, progress=True) -> None:
        return None  # scored per layer from |W| and the calibration inputs' norms

    def __call__(self, w: Tensor, h: Tensor, sparsity: float, n_m=None) -> Tensor:
        return keep_mask(w.abs() * torch.diag(h).clamp_min(0).sqrt()[None, :], sparsity, per_row=True, n_m=n_m)


def prune_model(model, method, batches: list[dict], sparsity: float, n_m=None, progress: bool = True,
                general: list[dict] | None = None) -> dict:
    """Prune `model` in place, block by block; returns the report (per-layer sparsity and error, time).
    A method whose `scores(model, general, domain)` returns scores (D-Pruner) scores the whole model
    first, on the open-domain `general` batches and the domain `batches`."""
    import time

    from rlx.compress.ptq import calibrated_layers, relative_error

    t0 = time.perf_counter()
    scores = method.scores(model, general, batches, progress)
    layers, zeros, total = {}, 0, 0
    for name, layer, h in calibrated_layers(model, batches, progress, "prune"):
        w = layer.weight.data.float()
        keep = keep_mask(scores[name], sparsity, per_row=False, n_m=n_m) if scores is not None else method(w, h, sparsity, n_m)
        pruned = w * keep
        layers[name] = {"sparsity": (pruned == 0).float().mean().item(), "relative_error": relative_error(w, pruned, h)}
        layer.weight.data.copy_(pruned.to(layer.weight.dtype))
        zeros += int((pruned == 0).sum())
        total += w.numel()
    errors = [r["relative_error"] for r in layers.values()]
    return {"sparsity": zeros / max(total, 1), "pruned_weights": total,
            "mean_relative_error": sum(errors) / max(len(errors), 1), "time_s": time.perf_counter() - t0,
            "layers": layers}
