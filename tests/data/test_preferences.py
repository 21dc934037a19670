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


# ---------------------------------------------------------------------------- SoliReward's ties

TIED = ReasoningPairs(ties=0.25, **SIZES)


def test_no_ties_is_the_old_data_byte_for_byte():
    # sha256 of the JSON of every split, written by the pairs code before ties existed
    import hashlib
    import json

    def digest(pairs):
        return hashlib.sha256(json.dumps({s: pairs.split(s) for s in ("train", "validation", "test")}).encode()).hexdigest()

    assert digest(MIXED) == "83a9fcab94277b29ac2c4f6bb769b63c089c9b5d2aa6281a8976113b455fd7d7"
    assert digest(ReasoningPairs(ties=0.0, **SIZES)) == "ad00f5df28ee4d616d769ed1561a1debed113df424360cd3b50ee7a3a1b02904"


def test_ties_come_in_the_requested_share_after_the_same_win_pairs():
    plain = ReasoningPairs(**SIZES).split("train")
    pairs = TIED.split("train")
    ties = [ex for ex in pairs if ex["tie"]]
    # 64 problems -> n win pairs; round(0.25 / 0.75 * n) ties, so a quarter of all pairs
    assert len(ties) == round(len(plain) / 3) and abs(len(ties) / len(pairs) - 0.25) < 1 / len(pairs)
    wins = [{k: v for k, v in ex.items() if k not in ("tie", "prompt_rejected", "chosen_pass", "rejected_pass")}
            for ex in pairs if not ex["tie"]]
    assert wins == plain  # the win pairs are untouched
    assert all(not ex["tie"] and ex["chosen_pass"] and not ex["rejected_pass"] for ex in pairs[:len(plain)])


def test_a_tie_pairs_two_correct_traces_of_equal_steps_from_two_problems():
    by_prompt = {ex["prompt"]: ex for ex in ReasoningPairs(**SIZES).split("train")}
    for ex in (ex for ex in TIED.split("train") if ex["tie"]):
        assert ex["prompt"] != ex["prompt_rejected"] and ex["chosen"] != ex["rejected"]  # never itself
        assert ex["chosen_pass"] and ex["rejected_pass"] and ex["kind"] == "tie"
        first, second = by_prompt[ex["prompt"]], by_prompt[ex["prompt_rejected"]]
        # each side is its own problem's correct trace, by the task's checker
        assert TIED.score(ex["chosen"], first) == 1.0 and TIED.score(ex["rejected"], second) == 1.0
        # same number of steps: chain_sum with k terms has k - 1 steps, one line each
        assert first["prompt"].count(" ") == second["prompt"].count(" ")
        assert len(ex["chosen"].splitlines()) == len(ex["rejected"].splitlines())


def test_fail_fail_ties_pair_two_wrong_traces():
    pairs = ReasoningPairs(ties=0.5, fail_fail_ties=True, **SIZES)
    by_prompt = {ex["prompt"]: ex for ex in ReasoningPairs(**SIZES).split("train")}
    fails = [ex for ex in pairs.split("train") if ex["tie"] and not ex["chosen_pass"]]
    assert fails
    for ex in fails:
        assert not ex["rejected_pass"] and ex["prompt"] != ex["prompt_rejected"]
        assert pairs.score(ex["chosen"], by_prompt[ex["prompt"]]) == 0.0
        assert pairs.score(ex["rejected"], by_prompt[ex["prompt_rejected"]]) == 0.0


def test_cross_prompt_win_pairs_keep_each_sides_prompt():
    pairs = ReasoningPairs(cross_prompt=True, **SIZES)
    by_prompt = {ex["prompt"]: ex for ex in ReasoningPairs(**SIZES).split("train")}
    wrong = [ex for ex in pairs.split("train") if ex["kind"] == "wrong"]
    moved = [ex for ex in wrong if ex["prompt_rejected"] != ex["prompt"]]
    assert len(moved) > len(wrong) / 2
    for ex in moved:
        other = by_prompt[ex["prompt_rejected"]]
        assert ex["rejected"] == other["rejected"]  # the other problem's own slipped trace
        assert pairs.score(ex["rejected"], other) == 0.0 and pairs.score(ex["chosen"], ex) == 1.0
        assert len(ex["rejected"].splitlines()) == len(ex["chosen"].splitlines())
    # each fail item is used once
    assert sorted(ex["rejected"] for ex in wrong) == sorted(by_prompt[ex["prompt"]]["rejected"] for ex in wrong)


def test_dpo_style_consumers_refuse_ties():
    from rlx.data.collate import pair_rows

    tie = next(ex for ex in TIED.split("train") if ex["tie"])
    with pytest.raises(RlxError, match="ties"):
        pair_rows([tie])
    rows = pair_rows([tie], ties=True)
    assert rows[0]["prompt"] == tie["prompt"] and rows[1]["prompt"] == tie["prompt_rejected"]


def test_bad_tie_settings_are_clear_errors():
    with pytest.raises(RlxError, match=r"\[0, 1\)"):
        ReasoningPairs(ties=1.0)
    with pytest.raises(RlxError, match="wrong"):
        ReasoningPairs(kinds=("long",), cross_prompt=True)


def test_verbose_bias_flips_the_share_of_long_training_pairs():
    from rlx.data.preferences import ReasoningPairs

    plain = ReasoningPairs(num_train=400, num_validation=40, num_test=40)
    biased = ReasoningPairs(num_train=400, num_validation=40, num_test=40, verbose_bias=0.5)
    pairs, flipped = plain.split("train"), biased.split("train")
    assert len(pairs) == len(flipped)
    long_pairs = [(a, b) for a, b in zip(pairs, flipped) if a["kind"] == "long"]
    swapped = [b for a, b in long_pairs if b.get("biased")]
    assert 0.35 < len(swapped) / len(long_pairs) < 0.65
    assert all(b["chosen"].count("check:") > b["rejected"].count("check:") for b in swapped)  # the longer one wins
    assert all(a == b for a, b in zip(pairs, flipped) if a["kind"] != "long")
    assert biased.split("validation") == plain.split("validation")  # held-out pairs keep the true preference
