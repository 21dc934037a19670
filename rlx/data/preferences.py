"""Preference pairs built from the reasoning task, for DPO-style objectives.

    rlx train algo=dpo data=reasoning_pairs
    rlx train algo=dpo data=reasoning_pairs data.kinds=[long]     # only the length preference

Every problem of a `ReasoningTask` split becomes one pair `(prompt, chosen, rejected)`; the
chosen side is always the concise, correct trace. Each pair has one `kind`, drawn (seeded) from
`kinds` among those that apply to the problem:

* "wrong": the rejected trace is the chosen one with one step's result off by a small non-zero
  integer, and the error carried through every later step and the final `#### answer`, as a
  model that slipped once would write it. The rejected answer is wrong (checked with the task's
  scorer). Arithmetic sources only; gsm_symbolic's free-text traces get a wrong `####` line.
* "long": the rejected trace is correct but re-checks every step ("check: 4 - 1 = 3", the
  format of `rlx.data.reasoning`), so the pair prefers the shorter of two right answers.
  Arithmetic sources only.
* "format": the rejected trace lacks its final `#### answer` line. The scorer falls back to the
  last number, which is still right, so this pair is about format, not correctness.

Each example also keeps "completion" (= chosen), "answer", "source" and "question", so the
loop's evaluation (perplexity of the chosen trace, accuracy by generation) works unchanged.
Pairs of a split come from that split's problems only: train never sees a validation or test
problem (the reasoning task already drops them from train).
"""
from __future__ import annotations

import functools
import random
from typing import Sequence

from rlx.data import check_split
from rlx.data.reasoning import ARITHMETIC, ReasoningTask, _derived_seed, _with_recheck, solve
from rlx.errors import RlxError

KINDS = ("wrong", "long", "format")
MAX_SLIP = 3  # a corrupted step is off by 1..3 either way: small, as a real slip would be
_CHECK = "check: "


class _KeyedReasoningTask(ReasoningTask):
    """The reasoning task with each arithmetic example's expression kept ("expression"), so a
    wrong trace can be re-derived from the problem rather than patched as text."""

    def _example(self, source: str, item: dict) -> tuple[str, dict] | None:
        pair = super()._example(source, item)
        if pair is not None and source in ARITHMETIC:
            pair[1]["expression"] = pair[0]
        return pair


def _concise(completion: str) -> str:
    # Train traces may already re-check their steps (recheck_prob); the chosen side never does.
    return "\n".join(line for line in completion.split("\n") if not line.startswith(_CHECK))


class ReasoningPairs:
    """`ReasoningTask` problems as (chosen, rejected) preference pairs; see the module docstring."""

    name = "reasoning_pairs"

    def __init__(self, kinds: Sequence[str] = ("wrong", "long"), **reasoning_task_kwargs):
        self.kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not self.kinds or not set(self.kinds) <= set(KINDS):
            raise RlxError(f"preference kinds {self.kinds} are not all known: choose from {', '.join(KINDS)}")
        self.task = _KeyedReasoningTask(**reasoning_task_kwargs)
        self.seed = self.task.seed

    def split(self, name: str) -> list[dict]:
        return self._splits[check_split(name)]

    def score(self, response: str, example: dict) -> float:
        return self.task.score(response, example)

    @functools.cached_property
    def _splits(self) -> dict[str, list[dict]]:
        return {name: self._pairs(name) for name in ("train", "validation", "test")}

    def _pairs(self, split: str) -> list[dict]:
        rng = random.Random(_derived_seed(self.seed, split, "pairs"))
        pairs = []
        for example in self.task.split(split):
            # Try the kinds in a seeded order; a problem no kind applies to is left out.
            for kind in rng.sample(self.kinds, len(self.kinds)):
                rejected = self._rejected(kind, example, rng)
                if rejected is not None:
                    pairs.append(self._pair(example, kind, rejected))
                    break
        if self.task.split(split) and not pairs:
            raise RlxError(f"no {split} problem gives a pair of kinds {self.kinds}: add a kind that applies")
        return pairs

    def _pair(self, example: dict, kind: str, rejected: str) -> dict:
        chosen = _concise(example["completion"])
        return {
            "prompt": example["prompt"],
            "chosen": chosen,
            "rejected": rejected,
            "kind": kind,
            "completion": chosen,
            "answer": example["answer"],
            "source": example["source"],
            "question": example["question"],
        }

    def _rejected(self, kind: str, example: dict, rng: random.Random) -> str | None:
        chosen = _concise(example["completion"])
        if kind == "long":
            longer = _with_recheck(chosen, example["num_steps"], example["source"])
            return longer if longer != chosen else None  # free-text traces have no steps to re-check
        if kind == "format":
            return chosen.rsplit("\n####", 1)[0]
        return self._wrong(example, rng)

    def _wrong(self, example: dict, rng: random.Random) -> str | None:
        """A trace whose answer the scorer rejects, or None when a few tries give none."""
        for _ in range(8):
            delta = rng.choice([d for d in range(-MAX_SLIP, MAX_SLIP + 1) if d])
            if "expression" in example and example["num_steps"] > 0:
                slipped = solve(example["expression"], rng.randrange(example["num_steps"]), delta)
                if slipped is None:
                    continue
                steps, value = slipped
                rejected = "\n".join(steps + [f"#### {value}"])
            else:  # no steps to slip in (a lone number, or gsm_symbolic's prose): a wrong final line
                body, answer = _concise(example["completion"]).rsplit("#### ", 1)
                if not answer.strip().lstrip("-").isdigit():
                    return None
                rejected = f"{body}#### {int(answer) + delta}"
            # A slip can cancel out (e.g. a later "* 0"); keep only answers the checker rejects.
            if self.task.score(rejected, example) == 0.0:
                return rejected
        return None
