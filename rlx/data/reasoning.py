"""The built-in verifiable reasoning task: reasoning-gym problems with rlx-written traces.

reasoning-gym supplies the problems and the exact scorer; rlx writes a chain-of-thought
completion for each one, because SFT needs traces. Arithmetic expressions are reduced one
operation per line ("4 - 1 = 3\\n3 - 7 = -4\\n#### -4"), so a problem with more terms takes
more steps. A seeded share of the train traces re-checks every step before answering:
redundant reasoning that length-penalty methods can learn to drop.

Splits come from seeds derived from `seed` (reasoning-gym seeds item i with `seed + i`, so
nearby seeds would share items); train then drops every problem that also appears in
validation or test, so train ends up a little smaller than `num_train`.
"""
import ast
import functools
import random
import re
from fractions import Fraction
from typing import Sequence

import reasoning_gym
from reasoning_gym.dataset import ProceduralDataset

from rlx.data import check_split
from rlx.errors import RlxError

ARITHMETIC = ("chain_sum", "basic_arithmetic")
SOURCES = ARITHMETIC + ("gsm_symbolic",)
PROMPT_STYLES = ("compact", "question")

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
# A number as a model writes it: optional sign, optional thousands commas, optional decimals.
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: the token after the last '####', else the last number; commas removed."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].split()
        if not tail:
            return None
        number = _NUMBER.search(tail[0])  # tolerate "$18." and "1,234"
        return (number.group() if number else tail[0]).replace(",", "")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


class _NoIntegerTrace(Exception):
    """A division by zero or with a remainder: reasoning-gym floors it, which a trace must not teach."""


def solve(expression: str, slip_step: int | None = None, delta: int = 0) -> tuple[list[str], int] | None:
    """Reduce an integer expression one operation at a time, in Python's order of evaluation.

    Returns the step lines ("4 - 1 = 3") and the value, or None when a division is not exact.
    Uses `ast` rather than `eval` so only + - * / and integers are ever computed. With
    `slip_step`, that step's result is off by `delta` and every later step is computed from the
    wrong value: a consistent wrong trace, for preference pairs.
    """
    steps: list[str] = []

    def record(lhs: str, result: Fraction) -> Fraction:
        if len(steps) == slip_step:
            result += delta
        steps.append(f"{lhs} = {result}")
        return result

    def value(node: ast.expr) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = value(node.operand)
            if isinstance(node.operand, ast.Constant):  # "-7" is a number; "-( 3 + 4 )" is a step
                return -inner
            return record(f"-({inner})", -inner)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div):
                if right == 0 or left % right:
                    raise _NoIntegerTrace
                result = left / right
            else:
                result = {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
            return record(f"{left} {_OPS[type(node.op)]} {right}", result)
        raise ValueError(f"cannot reduce {ast.unparse(node)!r} in {expression!r}: only integers and + - * /")

    try:
        result = value(ast.parse(expression, mode="eval").body)
    except _NoIntegerTrace:
        return None
    return steps, int(result)


def _derived_seed(seed: int, *parts: str) -> int:
    # String seeds hash with SHA-512, so these are stable across runs and far apart.
    return random.Random("/".join(["rlx", str(seed), *parts])).getrandbits(31)


@functools.cache
def _scorer(source: str) -> ProceduralDataset:
    # The scorers ignore the generator config, so one default instance per source serves all.
    return reasoning_gym.create_dataset(source, size=1, seed=0)


class ReasoningTask:
    """reasoning-gym problems (chain_sum, basic_arithmetic, gsm_symbolic) with step-by-step traces."""

    name = "reasoning"

    def __init__(
        self,
        sources: Sequence[str] = ("chain_sum",),
        num_train: int = 20000,
        num_validation: int = 256,
        num_test: int = 512,
        seed: int = 0,
        min_terms: int = 2,
        max_terms: int = 5,
        max_digits: int = 1,
        recheck_prob: float = 0.25,
        prompt_style: str = "compact",
        recheck_more: float = 0.0,
        recheck_max_passes: int = 3,
        hard_fraction: float = 0.0,
        hard_min_terms: int = 6,
        hard_max_terms: int = 8,
        hard_max_digits: int = 1,
        fold_prob: float = 0.0,
    ):
        self.sources = [sources] if isinstance(sources, str) else list(sources)
        if not self.sources or not set(self.sources) <= set(SOURCES):
            raise RlxError(f"reasoning sources {self.sources} are not all known: choose from {', '.join(SOURCES)}")
        if prompt_style not in PROMPT_STYLES:
            raise RlxError(f"unknown prompt_style {prompt_style!r}: choose from {', '.join(PROMPT_STYLES)}")
        if not 1 <= min_terms <= max_terms or max_digits < 1:
            raise RlxError(
                f"bad reasoning sizes (min_terms={min_terms}, max_terms={max_terms}, max_digits={max_digits}): "
                "need 1 <= min_terms <= max_terms and max_digits >= 1"
            )
        for name, p in (("recheck_prob", recheck_prob), ("hard_fraction", hard_fraction), ("fold_prob", fold_prob)):
            if not 0.0 <= p <= 1.0:
                raise RlxError(f"{name}={p} is not a probability: pass a value in [0, 1]")
        if not 0.0 <= recheck_more < 1.0:
            raise RlxError(f"recheck_more={recheck_more} must be in [0, 1): the chance of each further re-check pass")
        if hard_fraction > 0 and not (1 <= hard_min_terms <= hard_max_terms and hard_max_digits >= 1):
            raise RlxError(f"bad hard sizes (hard_min_terms={hard_min_terms}, hard_max_terms={hard_max_terms}, "
                           f"hard_max_digits={hard_max_digits})")
        if min(num_train, num_validation, num_test) < 0:
            raise RlxError("num_train, num_validation and num_test must be >= 0")
        self.sizes = {"train": num_train, "validation": num_validation, "test": num_test}
        self.seed = seed
        self.recheck_prob, self.recheck_more, self.recheck_max_passes = recheck_prob, recheck_more, recheck_max_passes
        self.prompt_style = prompt_style
        self.hard_fraction, self.fold_prob = hard_fraction, fold_prob
        arithmetic = dict(min_terms=min_terms, max_terms=max_terms, min_digits=1, max_digits=max_digits)
        self.configs = {"chain_sum": arithmetic, "basic_arithmetic": arithmetic, "gsm_symbolic": {}}
        self.hard = dict(min_terms=hard_min_terms, max_terms=hard_max_terms, min_digits=1, max_digits=hard_max_digits)

    def split(self, name: str) -> list[dict]:
        return self._splits[check_split(name)]

    def score(self, response: str, example: dict) -> float:
        answer = extract_answer(response)
        if answer is None:
            return 0.0
        entry = {"question": example["question"], "answer": example["answer"], "metadata": {}}
        return 1.0 if _scorer(example["source"]).score_answer(answer=answer, entry=entry) == 1.0 else 0.0

    @functools.cached_property
    def _splits(self) -> dict[str, list[dict]]:
        held_out = {name: self._generate(name) for name in ("validation", "test")}
        seen = {key for pairs in held_out.values() for key, _ in pairs}
        train = [example for key, example in self._generate("train") if key not in seen]
        recheck = random.Random(_derived_seed(self.seed, "recheck"))
        fold = random.Random(_derived_seed(self.seed, "fold"))  # its own stream: fold_prob=0 leaves the data as it was
        for example in train:
            lines = example["num_steps"]
            if self.fold_prob and fold.random() < self.fold_prob:
                example["completion"] = _folded(example["completion"], example["source"])
                lines = example["completion"].count("\n")  # the step lines above the answer line
            if recheck.random() < self.recheck_prob:
                passes = 1
                while self.recheck_more and passes < self.recheck_max_passes and recheck.random() < self.recheck_more:
                    passes += 1
                example["completion"] = _with_recheck(example["completion"], lines, example["source"], passes)
        return {"train": train, **{name: [example for _, example in pairs] for name, pairs in held_out.items()}}

    def _generate(self, split: str) -> list[tuple[str, dict]]:
        """(problem key, example) pairs for `split`, the sources sharing its size evenly, shuffled;
        with `hard_fraction`, that share of each source's problems drawn at the hard sizes, and
        every example labelled with its `difficulty`."""
        n, k = self.sizes[split], len(self.sources)
        pairs = []
        for j, source in enumerate(self.sources):
            m = n // k + (j < n % k)
            hard = round(self.hard_fraction * m) if source in ARITHMETIC else 0
            pairs += self._from_source(source, m - hard, _derived_seed(self.seed, split, source))
            if self.hard_fraction > 0:
                for _, example in pairs:
                    example.setdefault("difficulty", "easy")
            if hard:
                pairs += self._from_source(source, hard, _derived_seed(self.seed, split, source, "hard"), self.hard,
                                           difficulty="hard")
        random.Random(_derived_seed(self.seed, split, "mix")).shuffle(pairs)
        return pairs

    def _from_source(self, source: str, n: int, seed: int, config: dict | None = None,
                     difficulty: str | None = None) -> list[tuple[str, dict]]:
        # Spare indices make up for the few items whose trace cannot be written (inexact division).
        dataset = reasoning_gym.create_dataset(source, size=2 * n + 100, seed=seed, **(config or self.configs[source]))
        pairs = []
        for index in range(len(dataset)):
            if len(pairs) == n:
                break
            pair = self._example(source, dataset[index])
            if pair is not None:
                if difficulty is not None:
                    pair[1]["difficulty"] = difficulty
                pairs.append(pair)
        if len(pairs) < n:
            raise RlxError(f"reasoning-gym's {source} gave too few problems rlx can trace; check the data config")
        return pairs

    def _example(self, source: str, item: dict) -> tuple[str, dict] | None:
        """(problem key, example), or None when rlx cannot write a trace the scorer accepts."""
        if source in ARITHMETIC:
            key = item["metadata"]["expression"]
            solved = solve(key)
            if solved is None:
                return None
            steps, value = solved
            completion, num_steps = "\n".join(steps + [f"#### {value}"]), len(steps)
        else:
            key, body = item["question"], _cot_body(item["metadata"]["answer_cot"])
            completion = f"{body}\n#### {item['answer']}"
            num_steps = sum(1 for line in body.splitlines() if line.strip())
        compact = self.prompt_style == "compact" and source in ARITHMETIC
        prompt = f"{key} =\n" if compact else item["question"] + "\n"
        # Never train on a trace the scorer rejects (e.g. gsm_symbolic's scorer ignores minus signs).
        if _scorer(source).score_answer(answer=extract_answer(completion), entry=item) != 1.0:
            return None
        example = {
            "prompt": prompt,
            "completion": completion,
            "answer": item["answer"],
            "source": source,
            "num_steps": num_steps,
            "question": item["question"],
        }
        return key, example


def _cot_body(cot: str) -> str:
    """gsm_symbolic's worked solution without its own '####' line (which may read '36.0' for '36')."""
    return "\n".join(line for line in cot.splitlines() if not line.startswith("####")).strip()


def step_lines(text: str) -> int:
    """A response's arithmetic lines ("a + b = c"), re-checks left out: fewer than the problem's
    `num_steps` means it skipped or folded a step."""
    return sum("=" in line and not line.strip().startswith("check:") for line in text.split("\n"))


def _folded(completion: str, source: str) -> str:
    """A chain sum's trace with each pair of consecutive steps written as one line ("9 - 5 + 1 = 5"
    for "9 - 5 = 4" and "4 + 1 = 5"): the same answer in about half the lines, each line a harder
    sum to get right in one go. Other sources are left alone (folding across * or / would change
    what a line means)."""
    if source != "chain_sum":
        return completion
    *steps, answer = completion.split("\n")
    out, i = [], 0
    while i < len(steps):
        first, second = steps[i], steps[i + 1] if i + 1 < len(steps) else None
        lhs, result = first.rsplit(" = ", 1)
        if second is not None and second.startswith(result + " "):
            out.append(lhs + second[len(result):])
            i += 2
        else:
            out.append(first)
            i += 1
    return "\n".join(out + [answer])


def _with_recheck(completion: str, num_steps: int, source: str, passes: int = 1) -> str:
    """Repeat each arithmetic step as 'check: ...' before the answer line, `passes` times; other
    traces are left alone. The re-checks are removable: the answer line needs none of them."""
    if source not in ARITHMETIC:
        return completion
    lines = completion.split("\n")
    steps, answer = lines[:num_steps], lines[num_steps:]
    return "\n".join(steps + [f"check: {step}" for step in steps] * passes + answer)
