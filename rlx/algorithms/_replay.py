"""The rollout replay queue and the minibatch cutter that every online RL algorithm shares.

A rollout is sampled once and handed to the loop as several `make_batch` results, one minibatch
each (verl ppo_mini_batch_size / ppo_epochs, TRL num_mini_batches / num_ppo_epochs): GRPO and its
variants cut it into minibatches of whole groups, PPO and T-PPO into `epochs` shuffled passes.
While minibatches are queued `make_batch` never indexes its examples, so the loop's stream
draws nothing and resuming stays exact; the queue is part of the checkpoint.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class Replay:
    """The minibatches of the rollout being replayed, oldest first."""

    def __init__(self):
        self.minibatches: list[dict] = []

    def __len__(self) -> int:
        return len(self.minibatches)

    def next(self, rollout: Callable[[], list[dict]], device) -> dict:
        """The next minibatch, on `device` (a resumed queue comes back on the CPU); `rollout()`
        samples a new rollout's minibatches only once the queue is empty."""
        if not self.minibatches:
            self.minibatches = rollout()
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.minibatches.pop(0).items()}

    def state_dict(self) -> list[dict]:
        return self.minibatches

    def load_state_dict(self, minibatches: list[dict]) -> None:
        self.minibatches = list(minibatches)


class ReplayedRollouts:
    """The members of the algorithm contract that every critic-free online algorithm shares (GRPO,
    DLER, DRPO, GRPO-lambda, DOT, P3O): it trains the policy only, hands out its rollout's minibatches
    from `self._queue` (sampling `self._rollout(examples, state)` only when the queue is empty, so
    the stream draws nothing meanwhile), and checkpoints the queue and a stateful `self.reward`."""

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        from rlx.rewards import reward_state

        return {"queue": self._queue.state_dict(), **reward_state(self.reward)}

    def load_state_dict(self, state: dict) -> None:
        from rlx.rewards import load_reward_state

        self._queue.load_state_dict(state.get("queue", []))
        load_reward_state(self.reward, state)

    def make_batch(self, examples, state) -> dict:
        return self._queue.next(lambda: self._rollout(examples, state), state.model.device)


def minibatches(data: dict, parts: int, weight: Callable[[Tensor], int], metrics: dict, *, mask: str = "response_mask",
                epochs: int = 1, group_size: int = 1, shuffle: bool = True) -> list[dict]:
    """`epochs` passes over the rows of `data`, each cut into `parts` minibatches of whole groups of
    `group_size` rows (a fresh shuffle of the groups per pass if `shuffle`). Each minibatch carries
    the loop's num_targets (`weight` of its `data[mask]`), num_tokens (that mask's sum) and the
    rollout's `metrics`. Always exactly epochs * parts of them: `tensor_split` makes sizes differ by
    at most one group (`chunk` would make 3 of 6 rows for 4)."""
    m = data[mask]
    groups = m.shape[0] // group_size
    queue = []
    for _ in range(epochs):
        order = torch.randperm(groups) if shuffle else torch.arange(groups)
        for chunk in order.tensor_split(parts):
            rows = (chunk[:, None] * group_size + torch.arange(group_size)).flatten().to(m.device)
            mb = {k: v[rows] for k, v in data.items()}
            mb["num_targets"] = int(weight(mb[mask]))
            mb["num_tokens"] = int(mb[mask].sum())
            mb["metrics"] = metrics
            queue.append(mb)
    return queue
