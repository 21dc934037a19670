"""An endless, resumable stream of micro-batches of examples.

Each epoch is a fresh permutation drawn from `seed + epoch`, so the stream's position is two
integers and resuming needs no replay: `load_state_dict` jumps straight back.

Under data parallelism every rank walks the same stream and keeps every `world`-th micro-batch
(its `rank`-th of each round), so N ranks see the micro-batches one process would see with
N times the gradient accumulation, in the same order, and their positions stay equal.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class ExampleStream:
    def __init__(self, examples: Sequence[dict], batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples is fewer than one micro-batch of {batch_size}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next(self) -> list[dict]:
        """This rank's next micro-batch (of each round of `world`)."""
        batches = [self._next() for _ in range(self.world)]
        return batches[self.rank]

    def _next(self) -> list[dict]:
        """The next micro-batch; an epoch's tail shorter than a batch is dropped."""
        if self.pos + self.batch_size > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation()
        idx = self._order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return [self.examples[i] for i in idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation()


class NextBatch(Sequence):
    """The stream's next micro-batch, drawn on first use. The loop hands one to each
    `make_batch` call; an algorithm that is replaying a rollout it already holds (PPO's epochs
    and minibatches) never touches it, so no data is consumed and the stream position stays
    exact for resuming. An algorithm that needs more prompts than one micro-batch (dynamic
    sampling) draws them with `more()`, through the batch it was handed, not from the stream."""

    def __init__(self, stream: ExampleStream):
        self._stream, self._items = stream, None

    def _batch(self) -> list[dict]:
        if self._items is None:
            self._items = self._stream.next()
        return self._items

    def __getitem__(self, i):
        return self._batch()[i]

    def __len__(self) -> int:
        return len(self._batch())

    def more(self) -> list[dict]:
        """The stream's next micro-batch after this one (which is drawn first, so the order is the
        stream's whatever is indexed first)."""
        self._batch()
        return self._stream.next()


def draw_more(examples: Sequence[dict]) -> list[dict]:
    """`examples.more()`, or [] for a plain list of examples, which has no stream behind it."""
    return examples.more() if isinstance(examples, NextBatch) else []
