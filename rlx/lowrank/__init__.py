"""Low-rank training of the linear layers: LOST (a low-rank plus channel-sparse parameterization
chosen at build time) and TRP (periodic rank truncation during training, then a low-rank export).

    rlx train model.parameterization=lost                                   # LOST, the paper's defaults
    rlx train 'model.parameterization={name:lost,rank:0.25,sparsity:0.05,gamma:0.7}'
    rlx train hooks=trp hooks.trp.energy=0.95                               # TRP with a looser truncation

Both act on the same layers: the linear maps inside attention and MLP blocks (`rlx.layers.target_layers`,
the rule rlx/layers.py states beside the others).

`parameterize(model, spec)` is the one place that maps `model.parameterization` to a surgery; a
new parameterization is one more entry there.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import nn

from rlx.errors import RlxError

# ---------------------------------------------------------------------------- model.parameterization


def _surgeries() -> dict:
    from rlx.compander import apply_compander
    from rlx.lowrank.lost import apply_lost  # imported here: lost.py imports this package

    return {"lost": apply_lost, "compander": apply_compander}


def parse_spec(spec) -> tuple[str, dict]:
    """`lost` or `{name: lost, rank: 0.25, ...}` -> ("lost", {"rank": 0.25, ...})."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        options = {str(k): v for k, v in spec.items()}
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise RlxError("model.parameterization as a mapping needs a `name` (e.g. {name: lost, rank: 0.25})")
        return name, options
    raise RlxError(f"model.parameterization={spec!r}: give a name (lost) or a mapping with a `name` key")


def parameterize(model: nn.Module, spec) -> nn.Module:
    """Apply `model.parameterization` to `model` in place (None: nothing) and return it."""
    if spec is None:
        return model
    name, options = parse_spec(spec)
    if name == "trp":
        raise RlxError("TRP is a training procedure, not a parameterization: use hooks=trp")
    surgeries = _surgeries()
    if name not in surgeries:
        raise RlxError(f"unknown model.parameterization={name!r}; valid: {', '.join(surgeries)}")
    surgery = surgeries[name]
    valid = [p for p in inspect.signature(surgery).parameters if p != "model"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise RlxError(f"unknown option {unknown[0]!r} for model.parameterization={name}; valid: {', '.join(valid)}")
    surgery(model, **options)
    return model
