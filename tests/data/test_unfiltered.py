"""Unfiltered trajectories: every positive right and every negative wrong by the task's own
scorer, stable unique ids, the negative share and negative-only options on the same problems,
and held-out splits that are the reasoning task's."""
import pytest

from rlx.data.reasoning import ReasoningTask, extract_answer, solve
from rlx.data.unfiltered import ReasoningUnfiltered
from rlx.errors import RlxError

SIZES = {"num_train": 64, "num_validation": 16, "num_test": 16, "max_terms": 4}
DATA = ReasoningUnfiltered(**SIZES)


def problems(examples):
    return [ex["prompt"] for ex in examples]


def test_positives_are_right_and_negatives_wrong_by_the_scorer():
    train = DATA.split("train")
    assert {ex["correct"] for ex in train} == {True, False}
    for ex in train:
        assert DATA.score(ex["completion"], ex) == float(ex["correct"])
        if ex["correct"]:  # the correct reduction of the problem, by rlx's own solver
            steps, value = solve(ex["prompt"].removesuffix(" =\n"))
            assert ex["completion"] == "\n".join(steps + [f"#### {value}"])
        else:  # a slipped trace: its final answer is not the problem's
            assert extract_answer(ex["completion"]) != ex["answer"]


def test_ids_are_unique_stable_and_name_the_problem_and_side():
    ids = [ex["id"] for ex in DATA.split("train")]
    assert len(set(ids)) == len(ids)
    assert ids == [ex["id"] for ex in ReasoningUnfiltered(**SIZES).split("train")]
    by_id = {ex["id"]: ex for ex in DATA.split("train")}
    for i, ex in by_id.items():
        assert ex["correct"] == i.endswith("+")
        twin = by_id.get(i[:-1] + ("-" if ex["correct"] else "+"))
        assert twin is not None and twin["prompt"] == ex["prompt"]  # negatives=1: every problem has both


def test_positive_only_negative_only_and_a_share_cover_the_same_problems():
    full = DATA.split("train")
    positive = ReasoningUnfiltered(negatives=0, **SIZES).split("train")
    negative = ReasoningUnfiltered(positives=False, **SIZES).split("train")
    half = ReasoningUnfiltered(negatives=0.5, **SIZES).split("train")
    assert all(ex["correct"] for ex in positive) and not any(ex["correct"] for ex in negative)
    assert problems(positive) == problems(negative) == problems([ex for ex in full if ex["correct"]])
    assert positive == [ex for ex in full if ex["correct"]] and negative == [ex for ex in full if not ex["correct"]]
    n_neg = sum(not ex["correct"] for ex in half)
    assert [ex for ex in half if ex["correct"]] == positive and 0.3 * len(positive) < n_neg < 0.7 * len(positive)


def test_held_out_splits_are_the_reasoning_tasks_problems():
    task = ReasoningTask(**SIZES)
    for split in ("validation", "test"):
        held = DATA.split(split)
        assert [(ex["prompt"], ex["completion"]) for ex in held] == [(ex["prompt"], ex["completion"])
                                                                     for ex in task.split(split)]
    assert not set(problems(DATA.split("train"))) & set(problems(DATA.split("validation")))


def test_bad_options_are_one_line():
    with pytest.raises(RlxError, match="share of problems"):
        ReasoningUnfiltered(negatives=1.5)
    with pytest.raises(RlxError, match="no training example"):
        ReasoningUnfiltered(negatives=0, positives=False)
