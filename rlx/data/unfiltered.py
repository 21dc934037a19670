"""Unfiltered reasoning trajectories for SFT: each problem's correct trace and a wrong one.

    rlx train data=reasoning_unfiltered weighting=glow        # positives + negatives, GLOW-weighted
    rlx train data=reasoning_unfiltered data.negatives=0      # positive-only SFT on the same problems
    rlx train data=reasoning_unfiltered data.positives=false  # negative-only SFT

GLOW's paper ("Learning from Mistakes", arXiv 2601.04992) fine-tunes on a teacher's sampled
chain-of-thought trajectories without dropping the ones whose final answer is wrong. rlx has no
teacher to sample, so a problem's negative trajectory is the "wrong" trace of
`rlx.data.preferences.ReasoningPairs`: the correct reduction with one step's result off by a
small integer and the error carried to a wrong `#### answer`, as a reasoner that slipped once
writes it (checked wrong with the task's scorer). The positive is the same pair's concise
correct trace. Only problems that have a wrong trace are used, so positive-only and unfiltered
data cover exactly the same problems.

Train examples are SFT prompt/completion examples with, beside the task's fields:
    id       stable across runs of one config: "<problem index>+" (positive) or "<index>-" (negative)
    correct  True for the positive trace, False for the negative one
`negatives` is the share of problems whose negative is kept (a seeded draw per problem; 0: positive-
only, 1: every problem twice); `positives: false` drops the positives (negative-only SFT).
Validation and test are the reasoning task's own problems with their correct traces, so the
loop's evaluation (greedy accuracy, perplexity of the right answer) scores the task unchanged.
"""
from __future__ import annotations

import functools
import random

from rlx.data import check_split
from rlx.data.preferences import ReasoningPairs
from rlx.data.reasoning import _derived_seed
from rlx.errors import RlxError

_TASK_FIELDS = ("prompt", "answer", "source", "question")


class ReasoningUnfiltered:
    """Correct and slipped traces of the reasoning task's problems; see the module docstring."""

    name = "reasoning_unfiltered"

    def __init__(self, negatives: float = 1.0, positives: bool = True, **reasoning_task_kwargs):
        if not 0.0 <= negatives <= 1.0:
            raise RlxError(f"data.negatives={negatives} is the share of problems that keep a wrong trace: pass [0, 1]")
        if not positives and negatives == 0:
            raise RlxError("data.positives=false with data.negatives=0 leaves no training example")
        self.negatives, self.positives = negatives, positives
        self.pairs = ReasoningPairs(kinds=("wrong",), **reasoning_task_kwargs)
        self.task = self.pairs.task
        self.seed = self.task.seed

    def split(self, name: str) -> list[dict]:
        if check_split(name) != "train":
            return self.task.split(name)
        return self._train

    def score(self, response: str, example: dict) -> float:
        return self.task.score(response, example)

    @functools.cached_property
    def _train(self) -> list[dict]:
        rng = random.Random(_derived_seed(self.seed, "train", "negatives"))
        examples = []
        for k, pair in enumerate(self.pairs.split("train")):
            keep_negative = rng.random() < self.negatives  # drawn for every problem: a share's draws nest
            base = {field: pair[field] for field in _TASK_FIELDS}
            if self.positives:
                examples.append({**base, "completion": pair["chosen"], "id": f"{k}+", "correct": True})
            if keep_negative:
                examples.append({**base, "completion": pair["rejected"], "id": f"{k}-", "correct": False})
        return examples
