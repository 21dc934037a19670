"""GSM8K grade-school maths, from a local copy (train.jsonl/test.jsonl) or the Hugging Face hub.

GSM8K has no validation split, so a seeded shuffle of train lends its last `num_validation`
problems to validation. Completions keep the reference reasoning but drop the `<<48/2=24>>`
calculator annotations, which a model cannot be expected to produce; the final answer is
the number after '####', scored numerically with the same extractor as the reasoning task.
"""
import json
import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from rlx.data import check_split
from rlx.data.reasoning import extract_answer
from rlx.errors import RlxError

_ANNOTATION = re.compile(r"<<[^>]*>>")
_HOW_TO_FIX = "pass data.path=... (a folder with train.jsonl and test.jsonl) or data.source=hub"


def final_answer(reference: str) -> str:
    """The number after '#### ' on the reference answer's last line, commas removed."""
    return reference.strip().rsplit("####", 1)[-1].strip().replace(",", "")


def clean_completion(reference: str) -> str:
    """The reference answer without calculator annotations, as a completion (leading space)."""
    return " " + _ANNOTATION.sub("", reference).strip()


def to_example(row: dict) -> dict:
    question, reference = row["question"], row["answer"]
    return {
        "prompt": f"Question: {question}\nAnswer:",
        "completion": clean_completion(reference),
        "answer": final_answer(reference),
        "question": question,
    }


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise RlxError(f"gsm8k file {path} not found: {_HOW_TO_FIX}")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_local(path: str | None) -> tuple[list[dict], list[dict]]:
    if path is None:
        raise RlxError(f"gsm8k needs its data: {_HOW_TO_FIX}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RlxError(f"gsm8k folder {folder} not found: {_HOW_TO_FIX}")
    return _read_jsonl(folder / "train.jsonl"), _read_jsonl(folder / "test.jsonl")


def _load_hub() -> tuple[list[dict], list[dict]]:
    try:
        import datasets  # optional: only the hub source needs it
    except ImportError:
        raise RlxError("data.source=hub needs the `datasets` package: pip install 'rlx[hub]'") from None
    hub = datasets.load_dataset("openai/gsm8k", "main")
    return list(hub["train"]), list(hub["test"])


class GSM8K:
    """GSM8K as a prompt task: train minus `num_validation`, validation, and the official test set."""

    name = "gsm8k"

    def __init__(self, path: str | None = None, source: str = "local", num_validation: int = 500, seed: int = 0):
        if source not in ("local", "hub"):
            raise RlxError(f"unknown gsm8k source {source!r}: choose local (with data.path=...) or hub")
        train_rows, test_rows = _load_local(path) if source == "local" else _load_hub()
        if not 0 <= num_validation < len(train_rows):
            raise RlxError(f"num_validation={num_validation} must be in [0, {len(train_rows)}) for gsm8k's train set")
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        train = [to_example(train_rows[i]) for i in order]
        cut = len(train) - num_validation
        self._splits = {"train": train[:cut], "validation": train[cut:], "test": [to_example(r) for r in test_rows]}

    def split(self, name: str) -> list[dict]:
        return self._splits[check_split(name)]

    def score(self, response: str, example: dict) -> float:
        answer = extract_answer(response)
        try:
            return float(answer is not None and Decimal(answer) == Decimal(example["answer"]))
        except InvalidOperation:  # a non-numeric final token is simply wrong
            return 0.0
