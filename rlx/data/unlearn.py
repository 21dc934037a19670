"""A forget / retain split of the built-in reasoning task, for unlearning objectives (algo=npo).

    rlx train algo=npo data=reasoning_unlearn
    rlx train algo=npo data=reasoning_unlearn data.forget_terms=[3,4]   # forget two families

The problems are `rlx.data.reasoning.ReasoningTask`'s (chain_sum with the SFT base's settings,
conf/data/reasoning.yaml), so the base `model=tiny_sft` was trained on both sides. One problem
family is forgotten: the problems with `forget_terms` terms (default: 4, the longest chains);
the retain set is every other problem. As in TOFU, the forget set is part of what the model
was fine-tuned on, and the retain set is the rest of it.

Each example of a split is one forget problem paired with one retain problem of the same split,
drawn with a seeded generator (NPO's official dataloader pairs each forget item with a random
retain item; here the partner is drawn once, when the split is built, so a run is reproducible
from the data seed alone):

    {"forget": {prompt, completion, answer, ...}, "retain": {...},
     prompt, completion, answer, source, question, num_steps, num_terms}   # the forget item's, top level

The top-level fields are the forget item's, so the loop's evaluation (`eval/accuracy`,
`eval/perplexity` on `task.split("validation")`) measures the forget side, the one that should
fall. `forget_split(name)` and `retain_split(name)` give each side's plain problems (as
`ReasoningTask.split` gives them), for `rlx.evaluate.answers` with this task's `score`.
"""
from __future__ import annotations

import functools
import random
from typing import Sequence

from rlx.data import check_split
from rlx.data.reasoning import ReasoningTask, _derived_seed
from rlx.errors import RlxError

SPLITS = ("train", "validation", "test")


class _CountedReasoningTask(ReasoningTask):
    """The reasoning task with each example's number of terms kept ("num_terms", reasoning-gym's
    own count from the generator's metadata), the key that splits forget from retain."""

    def _example(self, source: str, item: dict) -> tuple[str, dict] | None:
        pair = super()._example(source, item)
        if pair is not None:
            if "num_terms" not in item["metadata"]:
                raise RlxError(f"data source {source} has no term count to split forget from retain: use chain_sum")
            pair[1]["num_terms"] = int(item["metadata"]["num_terms"])
        return pair


class ReasoningUnlearn:
    """Forget = the problems with `forget_terms` terms, retain = the rest; see the module docstring."""

    name = "reasoning_unlearn"

    def __init__(self, forget_terms: Sequence[int] = (4,), **reasoning_task_kwargs):
        self.forget_terms = {int(forget_terms)} if isinstance(forget_terms, int) else {int(n) for n in forget_terms}
        self.task = _CountedReasoningTask(**reasoning_task_kwargs)
        low, high = reasoning_task_kwargs.get("min_terms", 2), reasoning_task_kwargs.get("max_terms", 5)
        families = set(range(low, high + 1))
        if not self.forget_terms or not self.forget_terms < families:
            raise RlxError(f"data.forget_terms={sorted(self.forget_terms)} must be some, not all, of the term counts "
                           f"{low}..{high} (data.min_terms..data.max_terms), so both forget and retain have problems")
        self.seed = self.task.seed

    def forget_split(self, name: str) -> list[dict]:
        return self._sides[check_split(name)][0]

    def retain_split(self, name: str) -> list[dict]:
        return self._sides[check_split(name)][1]

    def split(self, name: str) -> list[dict]:
        return self._splits[check_split(name)]

    def score(self, response: str, example: dict) -> float:
        return self.task.score(response, example)  # a paired example's top level is its forget item

    @functools.cached_property
    def _sides(self) -> dict[str, tuple[list[dict], list[dict]]]:
        sides = {}
        for name in SPLITS:
            examples = self.task.split(name)
            sides[name] = ([ex for ex in examples if ex["num_terms"] in self.forget_terms],
                           [ex for ex in examples if ex["num_terms"] not in self.forget_terms])
        forget, retain = sides["train"]
        if not forget or not retain:
            raise RlxError(f"the train split has {len(forget)} forget and {len(retain)} retain problems: "
                           "raise data.num_train or change data.forget_terms")
        return sides

    @functools.cached_property
    def _splits(self) -> dict[str, list[dict]]:
        out = {}
        for name in SPLITS:
            forget, retain = self._sides[name]
            rng = random.Random(_derived_seed(self.seed, name, "unlearn_pairs"))
            # A held-out split with no retain problem (a tiny data.num_validation) pairs nothing.
            out[name] = [{**f, "forget": f, "retain": rng.choice(retain)} for f in forget] if retain else []
        return out
