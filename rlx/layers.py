"""Which layers a method touches: the three rules, side by side. They differ on purpose.

* `target_layers(model)`: the linear maps inside the attention and MLP blocks, found by module type
  (`nn.Linear`, or transformers' `Conv1D` as in GPT-2) and by a name pattern on the module's last
  name (`TARGETS`: Llama/Qwen/Mistral q/k/v/o/gate/up/down_proj, GPT-2 c_attn/c_proj/c_fc,
  GPT-NeoX/Falcon query_key_value/dense*, OPT out_proj/fc1/fc2, ...). Embeddings and the LM head
  are never targets, also not when a pattern matches them (a weight tied to the embeddings is
  skipped). Used by LOST and TRP (rlx/lowrank) and by post-training compression (rlx/compress),
  which calibrate and rewrite these layers only.
* `trainable_linears(model, skip)`: every `nn.Linear` with a trainable weight except those whose
  names end in `skip` (the LM head by default; embeddings are not linear layers). Used by the
  training-time quantizers (ECO, QAT, EQ-Net: rlx/quantizers), which, as in the ECO paper,
  quantize all linear layers but the LM head, wherever they sit (a critic's or adapter's too).
* `split_named(named)` / `is_projectable(name, param)`: for gradient-splitting optimizers (FRUGAL,
  GaLore, Fira: rlx/optimizers), which see parameters by name, not modules: 2-D weights whose
  names place them in attention/MLP blocks (including the factors of a LOST layer, named after the
  projection they replace), never embeddings, norms, biases or output layers; FRUGAL finds the
  logits layer by far the most sensitive to losing Adam's state. `split_named` checks that every
  trainable parameter lands in exactly one of the two sets.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from rlx.errors import RlxError

# ---------------------------------------------------------------------------- block linear layers (modules)

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


# ---------------------------------------------------------------------------- quantized layers (modules)


def trainable_linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` layers with a trainable weight whose names end in none of `skip`
    (the LM head and embeddings stay in full precision by default, as in the ECO paper)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad and not name.endswith(tuple(skip))]


# ---------------------------------------------------------------------------- projectable weights (parameters)

# The projections inside attention and MLP blocks: Llama/Qwen/Mistral (q/k/v/o, gate/up/down),
# GPT-2 (c_attn, c_proj, c_fc), GPT-NeoX/Falcon (query_key_value, dense_*), BERT-style (query, key, value,
# dense), and the factors of LOST layers (named after the projection they replace).
PROJECTABLE = r"(attn|attention|mlp|q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|c_attn|c_proj|c_fc|query_key_value|dense)"
# Never projected, whatever their name holds: token/position embeddings and the output layer.
KEPT_FULL = r"(embed|wte|wpe|lm_head|score|critic\.head)"


def is_projectable(name: str, param: Tensor, pattern: str = PROJECTABLE) -> bool:
    """A 2-D weight whose name matches `pattern` and names no embedding or output layer."""
    return param.ndim == 2 and re.search(pattern, name) is not None and re.search(KEPT_FULL, name) is None


def split_named(named: list[tuple[str, Tensor]], pattern: str = PROJECTABLE) -> tuple[list, list]:
    """(projectable, regular) lists of (name, parameter); every input lands in exactly one."""
    projectable = [(n, p) for n, p in named if is_projectable(n, p, pattern)]
    regular = [(n, p) for n, p in named if not is_projectable(n, p, pattern)]
    ids = [id(p) for _, p in named]
    assigned = [id(p) for _, p in projectable] + [id(p) for _, p in regular]
    assert len(set(ids)) == len(ids), "a parameter is listed twice"
    assert sorted(assigned) == sorted(ids), "a parameter was assigned to no set or to both"
    return projectable, regular
