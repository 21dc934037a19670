"""Low-rank training of the linear layers: LOST (a low-rank plus channel-sparse parameterization
chosen at build time) and TRP (periodic rank truncation during training, then a low-rank export).

    rlx train model.parameterization=lost                                   # LOST, the paper's defaults
    rlx train 'model.parameterization={name:lost,rank:0.25,sparsity:0.05,gamma:0.7}'
    rlx train hooks=trp hooks.trp.energy=0.95                               # TRP with a looser truncation

Both act on the same layers: the linear maps inside attention and MLP blocks, found by module type
(`nn.Linear`, or transformers' `Conv1D` as in GPT-2) and by a name pattern on the module's last name
(`TARGETS`: Llama/Qwen/Mistral q/k/v/o/gate/up/down_proj, GPT-2 c_attn/c_proj/c_fc, GPT-NeoX/Falcon
query_key_value/dense*, OPT out_proj/fc1/fc2, ...). Embeddings and the LM head are never targets,
also not when a pattern happens to match them (a weight tied to the embeddings is skipped).

`parameterize(model, spec)` is the one place that maps `model.parameterization` to a surgery; a
new parameterization is one more entry there.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Mapping

import torch
from torch import nn

from rlx.errors import RlxError

TARGETS = (
    r"(?:^|\.)(?:q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj"
    r"|c_attn|c_proj|c_fc|query_key_value|dense|dense_h_to_4h|dense_4h_to_h|out_proj|fc1|fc2"
    r"|wq|wk|wv|wo|w1|w2|w3)$"
)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2): a linear map whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def target_layers(model: nn.Module, pattern: str | None = TARGETS) -> dict[str, nn.Module]:
    """The attention/MLP linear layers of `model` by qualified name, in module order (`pattern` None: TARGETS)."""
    pattern = TARGETS if pattern is None else pattern
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise RlxError(f"bad layer pattern {pattern!r}: {e}") from None
    embeddings = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(model, get, lambda: None)()
        if layer is not None and getattr(layer, "weight", None) is not None:
            embeddings.add(id(layer.weight))
    out = {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) or not regex.search(name):
            continue
        if id(module.weight) in embeddings or name.split(".")[-1] == "lm_head":
            continue
        out[name] = module
    return out


def out_in(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's matrix as (out_features, in_features), whichever way it is stored."""
    w = module.weight if weight is None else weight
    return w.t() if is_conv1d(module) else w


# ---------------------------------------------------------------------------- model.parameterization


def _surgeries() -> dict:
    from rlx.lowrank.lost import apply_lost  # imported here: lost.py imports this package

    return {"lost": apply_lost}


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
