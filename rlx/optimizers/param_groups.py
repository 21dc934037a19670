"""Which parameters a gradient-splitting optimizer may project, by one explicit rule.

FRUGAL, GaLore and Fira project only the weight matrices of the attention and MLP blocks; the
embeddings, norms, biases and the LM head stay with a full state-full optimizer (FRUGAL finds the
logits layer by far the most sensitive to losing Adam's state). The rule below decides from each
parameter's name and shape, and `split_named` checks that every trainable parameter lands in
exactly one of the two sets.
"""
from __future__ import annotations

import re

from torch import Tensor

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
