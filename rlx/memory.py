"""What a run holds between optimizer steps, measured from the tensors themselves.

Bytes are summed over distinct storages (tied weights and views count once), so a parameter
that holds a one-element placeholder while its values live as codes (rlx/quant/stored.py)
costs its codes, not its shape. Modules that keep tensors outside parameters and buffers
expose them through a `held_tensors()` method.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

MB = 2**20


def _storage_bytes(tensors: Iterable[torch.Tensor], seen: set) -> int:
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _model_tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():
        if hasattr(module, "held_tensors"):
            yield from module.held_tensors()


def _optimizer_tensors(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:  # skip step counters
                yield v


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """MB held by the model's weights and by the optimizer's state (each storage counted once)."""
    seen: set = set()
    weights = _storage_bytes(_model_tensors(model), seen)
    states = _storage_bytes(_optimizer_tensors(optimizer), seen)
    return {"weights_MB": weights / MB, "optimizer_MB": states / MB, "held_MB": (weights + states) / MB}
