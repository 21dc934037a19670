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
* `verbose_bias` (a share in [0, 1]): that share of the training split's "long" pairs is flipped,
  the re-checked trace marked chosen (and flagged "biased"), as annotators who equate length with
  care would label them. A reward model trained on them over-rewards verbosity while still telling
  right from wrong: the imperfect proxy that constrained RLHF and Ctrl-U are about. Held-out pairs
  keep the true preference.
* "careful": the one kind whose chosen side is not concise: the right answer with every step
  re-checked, against a concise slipped trace. Correctness prefers the chosen side, brevity the
  rejected one: the conflict multi-objective methods (algo=raco) are about. Not for ties or
  cross-prompt pairing.

Each example also keeps "completion" (= chosen), "answer", "source" and "question", so the
loop's evaluation (perplexity of the chosen trace, accuracy by generation) works unchanged.
Pairs of a split come from that split's problems only: train never sees a validation or test
problem (the reasoning task already drops them from train).

SoliReward's pairing (Lian et al., 2025, arXiv 2512.22170, §3: single-item Pass/Fail labels,
paired across prompts), for `rlx train algo=rm algo.loss=bt_ties data.ties=0.25`:

* items are labelled: the concise correct trace of a problem passes; its slipped "wrong" trace
  fails. A "long" or "format" rejected trace is a fail too (it is not what the chosen side is:
  concise and correct), so a win pair's chosen side always passes and its rejected side fails.
* `ties` (share of all pairs, in [0, 1)): tie pairs (Pass, Pass) are added after the win pairs:
  the concise correct traces of two *different* problems with the same number of steps (same
  number of terms), so a tie never says anything about length. `ties: 0` gives exactly the
  pairs above, byte for byte. A tie pair's `completion`, `answer`, `source` and `question` are
  those of its first item's problem.
* `fail_fail_ties`: ties may also pair two failing (slipped) traces of equal length, as the
  official code's rule `quality_win == quality_lose` would; off by default, since the paper's
  emphasis (its run name `win_win`) is on (Pass, Pass). A tie's first item is drawn uniformly
  from all labelled items, so (Fail, Fail) ties come in proportion to the fail items.
* `cross_prompt`: each "wrong" pair's rejected side is the slipped trace of another problem with
  the same number of steps (each fail item is used once, so the win pairs' count and items are
  those of in-prompt pairing); "long" and "format" pairs stay in-prompt (they are relative
  preferences, not labels).

With `ties` or `cross_prompt` on, every example also carries "tie" (bool), "prompt_rejected"
(the rejected side's own prompt; `rlx.data.collate.pair_rows` reads it) and "chosen_pass" /
"rejected_pass" (the items' labels). Tie pairs are for `algo=rm algo.loss=bt_ties` (its
`loss=bt` skips them): a DPO loss would read a tie as a preference, so `pair_rows` refuses them
(one clear error) unless the algorithm asks for ties. Cross-prompt win pairs are scored each side
with its own prompt (the DPO family too, through `pair_rows`).
"""
from __future__ import annotations

import functools
import random
from typing import Sequence

from rlx.data import check_split
from rlx.data.reasoning import ARITHMETIC, ReasoningTask, _derived_seed, _with_recheck, solve
from rlx.errors import RlxError

KINDS = ("wrong", "long", "format", "careful")
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


def _steps(trace: str) -> int:
    """The trace's number of steps: its non-empty lines before the '####' answer line."""
    return sum(1 for line in trace.split("\n") if line.strip() and not line.startswith("####"))


def _items(pairs: list[dict]) -> list[dict]:
    """The labelled single items of the pairs: each problem's concise correct trace (pass) and,
    where the pair is "wrong", its slipped trace (fail)."""
    items = []
    for p in pairs:
        items.append({"prompt": p["prompt"], "trace": p["chosen"], "pass": True, "steps": _steps(p["chosen"]), "problem": p})
        if p["kind"] == "wrong":
            items.append({"prompt": p["prompt"], "trace": p["rejected"], "pass": False, "steps": _steps(p["rejected"]),
                          "problem": p})
    return items


def _pair_across_prompts(pairs: list[dict], rng: random.Random) -> None:
    """In place: each "wrong" pair's rejected side becomes the slipped trace of another problem
    with as many steps (a seeded shuffle of each length's pairs, then a rotation by one, so each
    fail item is used once). A pair whose rotated partner has its own prompt stays in-prompt."""
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(pairs):
        if p["kind"] == "wrong":
            buckets.setdefault(_steps(p["chosen"]), []).append(i)
    for index in buckets.values():
        rng.shuffle(index)
        fails = [(pairs[j]["prompt"], pairs[j]["rejected"]) for j in index]
        for k, i in enumerate(index):
            prompt, trace = fails[(k + 1) % len(index)]
            if prompt != pairs[i]["prompt"]:
                pairs[i]["rejected"], pairs[i]["prompt_rejected"] = trace, prompt


class ReasoningPairs:
    """`ReasoningTask` problems as (chosen, rejected) preference pairs; see the module docstring."""

    name = "reasoning_pairs"

    def __init__(self, kinds: Sequence[str] = ("wrong", "long"), ties: float = 0.0, cross_prompt: bool = False,
                 fail_fail_ties: bool = False, verbose_bias: float = 0.0, **reasoning_task_kwargs):
        self.kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not self.kinds or not set(self.kinds) <= set(KINDS):
            raise RlxError(f"preference kinds {self.kinds} are not all known: choose from {', '.join(KINDS)}")
        if not 0.0 <= ties < 1.0:
            raise RlxError(f"data.ties={ties} is the share of tie pairs: pass a value in [0, 1)")
        if (ties or cross_prompt) and "careful" in self.kinds:
            raise RlxError("data.kinds 'careful' (a long right trace over a short wrong one) is not for ties or "
                           "cross-prompt pairing, which label concise traces")
        if (cross_prompt or fail_fail_ties) and "wrong" not in self.kinds:
            raise RlxError("data.cross_prompt and data.fail_fail_ties pair slipped (wrong) traces: add 'wrong' to data.kinds")
        if not 0.0 <= verbose_bias <= 1.0 or (verbose_bias and (ties or cross_prompt)):
            raise RlxError(f"data.verbose_bias={verbose_bias} is the share of 'long' pairs flipped, in [0, 1], "
                           "and not for ties or cross-prompt pairing")
        self.ties, self.cross_prompt, self.fail_fail_ties = ties, cross_prompt, fail_fail_ties
        self.verbose_bias = verbose_bias
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
        if self.verbose_bias and split == "train":  # held-out pairs keep the true preference
            flip = random.Random(_derived_seed(self.seed, split, "verbose"))
            pairs = [{**p, "chosen": p["rejected"], "rejected": p["chosen"], "completion": p["rejected"], "biased": True}
                     if p["kind"] == "long" and flip.random() < self.verbose_bias else p for p in pairs]
        if not (self.ties or self.cross_prompt):
            return pairs  # today's pairs, untouched
        # Own seeded streams, so the win pairs above are the same whatever these options are.
        pairs = [{**p, "tie": False, "prompt_rejected": p["prompt"], "chosen_pass": True, "rejected_pass": False}
                 for p in pairs]
        items = _items(pairs)  # taken before cross-prompt pairing moves the fail items around
        if self.cross_prompt:
            _pair_across_prompts(pairs, random.Random(_derived_seed(self.seed, split, "cross_prompt")))
        return pairs + self._ties(items, len(pairs), random.Random(_derived_seed(self.seed, split, "ties")), split)

    def _ties(self, items: list[dict], num_wins: int, rng: random.Random, split: str) -> list[dict]:
        """round(ties / (1 - ties) * num_wins) tie pairs, so they are `ties` of all pairs."""
        count = round(self.ties / (1 - self.ties) * num_wins)
        if not count:
            return []
        items = [item for item in items if item["pass"] or self.fail_fail_ties]
        buckets: dict[tuple, list[dict]] = {}
        for item in items:
            buckets.setdefault((item["pass"], item["steps"]), []).append(item)
        # An item can be tied only to one of another problem (another prompt) in its bucket.
        usable = [item for item in items if any(o["prompt"] != item["prompt"] for o in buckets[item["pass"], item["steps"]])]
        if not usable and split != "train":
            return []  # a held-out split too small to tie any two problems is left with its win pairs
        if not usable:
            raise RlxError(f"no two {split} problems have traces of equal length to tie: add problems or set data.ties=0")
        ties = []
        while len(ties) < count:
            first = rng.choice(usable)
            second = rng.choice(buckets[first["pass"], first["steps"]])
            if second["prompt"] == first["prompt"]:
                continue  # never an item with itself (nor with a copy of its own problem)
            problem = first["problem"]
            ties.append({
                "prompt": first["prompt"], "chosen": first["trace"], "rejected": second["trace"], "kind": "tie",
                "completion": problem["completion"], "answer": problem["answer"], "source": problem["source"],
                "question": problem["question"], "tie": True, "prompt_rejected": second["prompt"],
                "chosen_pass": first["pass"], "rejected_pass": second["pass"],
            })
        return ties

    def _pair(self, example: dict, kind: str, rejected: str) -> dict:
        chosen = _concise(example["completion"])
        if kind == "careful":
            chosen = _with_recheck(chosen, example["num_steps"], example["source"])
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
        if kind == "careful" and _with_recheck(chosen, example["num_steps"], example["source"]) == chosen:
            return None  # nothing to re-check: no longer side
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
