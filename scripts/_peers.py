"""Peer implementations for the optimizer benchmark, built the way rlx builds its `_partial_`
optimizers: called with the loop's named parameter groups. The attention/MLP matrices (rlx's rule in
rlx/optimizers/param_groups.py) get the projection, one group each so the rank follows the density;
everything else is plain AdamW inside the same optimizer, as in the papers' scripts.

    python scripts/bench_optim.py --runs galore_torch fira_package
"""
from __future__ import annotations

import warnings

from rlx.layers import split_named
from rlx.optimizers.projectors import subspace_size


def _groups(params, density: float, rank: int | None, update_gap: int, scale: float, scale_key: str) -> list[dict]:
    named = [item for group in params for item in group["params"]]
    projectable, regular = split_named(named)
    groups = [{"params": [p for _, p in regular]}]
    for _, p in projectable:
        r = max(1, subspace_size(p.shape, "svd", density, rank))
        groups.append({"params": [p], "rank": r, "update_proj_gap": update_gap, scale_key: scale, "proj_type": "std"})
    return groups


def _peer(cls, scale_key: str, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
          density: float = 0.25, rank: int | None = None, update_gap: int = 200, scale: float = 0.25):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # both subclass a deprecated copy of transformers' AdamW
        return cls(_groups(params, density, rank, update_gap, scale, scale_key), lr=lr, betas=tuple(betas), eps=eps,
                   weight_decay=weight_decay)


def galore_torch_adamw(params, **options):
    """galore-torch's GaLoreAdamW (the GaLore authors' package)."""
    from galore_torch import GaLoreAdamW

    return _peer(GaLoreAdamW, "scale", params, **options)


def fira_package_adamw(params, **options):
    """The `fira` package's FiraAdamW (the Fira authors' code; its residual is G - alpha*P*R)."""
    from fira import FiraAdamW

    return _peer(FiraAdamW, "alpha", params, **options)
