"""Hook events of the training loop and the dispatcher that calls them in order.

The loop calls, per run and per optimizer step:

    on_train_start
    repeat:  on_step_start -> (forward/backward per micro-batch) -> on_after_backward
             -> (gradient clipping) -> on_before_optimizer_step -> (optimizer step)
             -> on_step_end
    on_train_end

Every event receives the `TrainState` and may mutate it (the model, its gradients, the
optimizer). Methods inject themselves here: ECO error feedback around the
optimizer step, QAT phase switches at step start, gradient splitting after backward.
A hook that wants to change the loss belongs in the algorithm instead.

A hook with state implements `state_dict`/`load_state_dict`; it is checkpointed with the run.
A hook that reports numbers (a memory report, a phase switch) puts them in its `metrics` dict;
the loop logs and clears them after each step and at the end of the run. A hook that holds
tensors of its own outside the model and the loop's optimizer (EQ-Net's Adam over its LSQ steps)
yields them from `held_tensors`, so the memory report counts them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from torch import Tensor

    from rlx.state import TrainState

EVENTS = (
    "on_train_start",
    "on_step_start",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_step_end",
    "on_train_end",
)


class Hook:
    """The no-op hook: subclass and override the events you need. `quantizer=none` is this.

    `metrics` holds one-off numbers to log after the current step (the loop reads and clears it);
    every instance has its own, made before any `__init__` runs."""

    metrics: dict[str, float]

    def __new__(cls, *args, **kwargs):
        hook = super().__new__(cls)
        hook.metrics = {}
        return hook

    def on_train_start(self, state: TrainState) -> None: ...
    def on_step_start(self, state: TrainState) -> None: ...
    def on_after_backward(self, state: TrainState) -> None: ...
    def on_before_optimizer_step(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def held_tensors(self) -> Iterator[Tensor]:
        return iter(())


class HookList:
    """Calls each hook's event in order; `hooks.on_step_start(state)` etc. Hooks are named
    (`quantizer`, or their key under `hooks:`) so their checkpointed state finds its owner."""

    def __init__(self, hooks: dict[str, Hook] | None = None):
        self.named = dict(hooks or {})
        self.hooks = list(self.named.values())

    def __getattr__(self, event: str):
        if event not in EVENTS:
            raise AttributeError(event)

        def dispatch(state: TrainState) -> None:
            for hook in self.hooks:
                getattr(hook, event)(state)

        return dispatch

    def pop_metrics(self) -> dict[str, float]:
        """What the hooks reported since the last call (and clear it)."""
        out: dict[str, float] = {}
        for hook in self.hooks:
            if hook.metrics:
                out.update(hook.metrics)
                hook.metrics = {}
        return out

    def held_tensors(self) -> Iterator[Tensor]:
        for hook in self.hooks:
            yield from hook.held_tensors()

    def state_dict(self) -> dict[str, dict]:
        return {name: h.state_dict() for name, h in self.named.items()}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        # A hook added or removed between runs (a debugging hook, say) has no state to match.
        for name, hook in self.named.items():
            if name in states:
                hook.load_state_dict(states[name])
