"""Preference pairs from the reasoning task: deterministic, wrong answers really wrong, long
traces really longer and still right, no held-out problem in train."""
import pytest

from rlx.data.preferences import ReasoningPairs
from rlx.data.reasoning import extract_answer, solve
from rlx.errors import RlxError

SIZES = {"num_train": 64, "num_validation": 16, "num_test": 16}
MIXED = ReasoningPairs(kinds=("wrong", "long", "format"), sources=("chain_sum", "basic_arithmetic"), **SIZES)


def test_pairs_are_deterministic():
    again = ReasoningPairs(kinds=("wrong", "long", "format"), sources=("chain_sum", "basic_arithmetic"), **SIZES)
    for split in ("train", "validation", "test"):
        assert MIXED.split(split) == again.split(split)
    other_seed = ReasoningPairs(kinds=("wrong", "long", "format"), sources=("chain_sum", "basic_arithmetic"),
                                seed=1, **SIZES)
    assert MIXED.split("train") != other_seed.split("train")


def test_examples_keep_what_evaluation_needs():
    for ex in MIXED.split("validation"):
        assert ex["completion"] == ex["chosen"] != ex["rejected"]
        assert {"prompt", "answer", "source", "question", "kind"} <= set(ex)
    assert {ex["kind"] for ex in MIXED.split("train")} == {"wrong", "long", "format"}


def test_wrong_pairs_have_a_wrong_rejected_answer():
    wrong = [ex for ex in MIXED.split("train") if ex["kind"] == "wrong"]
    assert len(wrong) > 5
    for ex in wrong:
        assert MIXED.score(ex["chosen"], ex) == 1.0
        assert MIXED.score(ex["rejected"], ex) == 0.0
        # the slip is a step's result, carried on: same number of lines, the last one a '####'
        assert len(ex["rejected"].splitlines()) == len(ex["chosen"].splitlines())
        assert ex["rejected"].splitlines()[-1].startswith("#### ")


def test_the_slip_propagates_to_later_steps():
    # 6 - 9 + 4: step 0 is "6 - 9 = -3"; off by +2 it reads -1, and the next step uses -1.
    steps, value = solve("6 - 9 + 4", 0, 2)
    assert steps == ["6 - 9 = -1", "-1 + 4 = 3"] and value == 3
    # with no slip it is exactly `solve`
    assert solve("(3 + 4) * 2 - -( 5 )", 99, 2) == solve("(3 + 4) * 2 - -( 5 )")


def test_long_pairs_have_the_same_answer_and_a_longer_rejected():
    long = [ex for ex in MIXED.split("train") if ex["kind"] == "long"]
    assert len(long) > 5
    for ex in long:
        assert extract_answer(ex["rejected"]) == extract_answer(ex["chosen"])
        assert MIXED.score(ex["rejected"], ex) == 1.0
        assert len(ex["rejected"]) > len(ex["chosen"]) and "check: " in ex["rejected"]
        assert "check: " not in ex["chosen"]


def test_format_pairs_drop_the_answer_line():
    for ex in (ex for ex in MIXED.split("train") if ex["kind"] == "format"):
        assert ex["chosen"].startswith(ex["rejected"]) and "####" not in ex["rejected"]


def test_no_held_out_problem_in_train():
    train = {ex["prompt"] for ex in MIXED.split("train")}
    held_out = {ex["prompt"] for split in ("validation", "test") for ex in MIXED.split(split)}
    assert train and held_out and not train & held_out


def test_gsm_symbolic_gets_wrong_answer_pairs():
    pairs = ReasoningPairs(kinds=("wrong",), sources=("gsm_symbolic",), num_train=8, num_validation=4, num_test=4)
    for ex in pairs.split("train"):
        assert pairs.score(ex["chosen"], ex) == 1.0 and pairs.score(ex["rejected"], ex) == 0.0


def test_unknown_kind_is_one_clear_error():
    with pytest.raises(RlxError, match="not all known"):
        ReasoningPairs(kinds=("shorter",))
