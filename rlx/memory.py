"""What a run holds between optimizer steps, and the peak of a step, measured from the tensors.

Bytes are summed over distinct storages (tied weights and views count once), so a parameter
that holds a one-element placeholder while its values live as codes (rlx/quantizers/stored.py)
costs its codes, not its shape. Modules that keep tensors outside parameters and buffers
expose them through a `held_tensors()` method.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Iterable

import torch
from torch import nn

MB = 2**20


def _storage_bytes(tensors: Iterable[torch.Tensor], seen: set) -> int:
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao's 8-bit state): count what it holds
            names, _ = t.__tensor_flatten__()
            total += _storage_bytes((getattr(t, n) for n in names), seen)
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


def _optimizer_tensors_of(states: Iterable[dict]):
    for state in states:
        for v in state.values():
            if hasattr(v, "__dict__") and not isinstance(v, torch.Tensor):  # a helper object (GaLore's projector)
                yield from (t for t in vars(v).values() if isinstance(t, torch.Tensor))
                continue
            if isinstance(v, torch.Tensor) and v.numel() > 1:  # skip step counters
                yield v


def _group_label(group: dict, index: int) -> str:
    return f"{index}_{group['kind']}" if "kind" in group else str(index)  # e.g. FRUGAL's regular/projectable


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer,
                  hook_tensors: Iterable[torch.Tensor] = ()) -> dict[str, float]:
    """MB held by the model's weights, by the optimizer's state (each storage counted once), with
    the state of each parameter group under `optimizer_MB/group<label>`, and by the hooks outside
    both (`hooks_MB`: e.g. EQ-Net's own Adam over its LSQ steps)."""
    seen: set = set()
    weights = _storage_bytes(_model_tensors(model), seen)
    report, states = {}, 0
    for i, group in enumerate(optimizer.param_groups):
        per_param = (optimizer.state.get(p, {}) for p in group["params"])
        held = _storage_bytes(_optimizer_tensors_of(per_param), seen)
        report[f"optimizer_MB/group{_group_label(group, i)}"] = held / MB
        states += held
    hooks = _storage_bytes(hook_tensors, seen)
    return {"weights_MB": weights / MB, "optimizer_MB": states / MB, "hooks_MB": hooks / MB,
            "held_MB": (weights + states + hooks) / MB, **report}


# ---------------------------------------------------------------------------- the peak of a step


class StepPeak:
    """The most memory a step had allocated at any moment: weights, optimizer state, gradients,
    activations and temporaries (an SVD's factors, a decoded weight). `start()`/`stop()` around the
    step; `stop()` returns MB. On CUDA it is the allocator's peak. On a CPU it is the memory held at
    the start plus the highest point of the step's allocations as the torch profiler records them
    (the profiler runs for this one step only). The profiler's own notices on the C-level stderr
    are dropped; anything else written there during the step is passed on when it ends."""

    NOISE = ("SyncActivityProfilerHandler", "allocated before the profiling started")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.profiler = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        from torch.profiler import ProfilerActivity, profile

        self.held = memory_report(self.model, self.optimizer)["held_MB"]
        self.stderr = _StderrFilter(self.NOISE)
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.start()

    def close(self) -> None:
        """Stop the profiler if it still runs (the step raised before `stop`)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
            self.stderr.restore()

    def stop(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / MB
        profiler = self.profiler
        self.close()
        events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type().name == "CPU")
        running = peak = 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        return self.held + peak / MB


class _StderrFilter:
    """Send file descriptor 2 to a temporary file until `restore()`, then replay it without the
    lines that contain any of `noise`."""

    def __init__(self, noise: tuple[str, ...]):
        self.noise = noise
        sys.stderr.flush()
        self.saved, self.buffer = os.dup(2), tempfile.TemporaryFile()
        os.dup2(self.buffer.fileno(), 2)

    def restore(self) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.buffer.seek(0)
        kept = [line for line in self.buffer.read().decode(errors="replace").splitlines(keepends=True)
                if not any(n in line for n in self.noise)]
        self.buffer.close()
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
