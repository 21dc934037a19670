"""Data sets, as tasks: each task owns its splits and, where answers are checkable, its scorer.

A task is what `conf/data/*.yaml` builds. Two kinds of example flow through rlx:

* prompt tasks (reasoning, gsm8k): `{"prompt": str, "completion": str, "answer": str, ...}`;
  `task.score(response, example)` returns 1.0 for a correct final answer, else 0.0.
* text corpora (shakespeare): `{"text": str}`; evaluated by perplexity only.

Algorithms turn lists of examples into tensors (tokenisation and loss masks belong to the
objective), so a task never sees a tokenizer.
"""
from typing import Protocol, Sequence

SPLITS = ("train", "validation", "test")


class Task(Protocol):
    name: str

    def split(self, name: str) -> Sequence[dict]:
        """The examples of `train`, `validation` or `test`, deterministic for a given seed."""

    def score(self, response: str, example: dict) -> float:
        """1.0 if `response` (the model's completion) reaches `example`'s answer, else 0.0."""


def check_split(name: str) -> str:
    """`name` if it is a split, else a one-line error listing the splits."""
    from rlx.errors import RlxError

    if name not in SPLITS:
        raise RlxError(f"unknown split {name!r}: choose from {', '.join(SPLITS)}")
    return name
