"""The reasoning task: traces, scoring, determinism and split hygiene."""
import re

import pytest

from rlx.data.reasoning import SOURCES, ReasoningTask, extract_answer, solve
from rlx.errors import RlxError


def small(**kwargs) -> ReasoningTask:
    return ReasoningTask(**{"num_train": 300, "num_validation": 100, "num_test": 100, **kwargs})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4 - 1 = 3\n3 - 7 = -4\n#### -4", "-4"),
        ("no answer here", None),
        ("#### 1,234", "1234"),
        ("#### $18.\nthanks", "18"),
        ("#### 2 #### 5 apples", "5"),  # the last marker wins
        ("####", None),
        ("so 3 + 4 = 7, the answer is 7.", "7"),  # no marker: the last number
        ("#### four", "four"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_solve_reduces_left_to_right_one_step_a_line():
    assert solve("4 - 1 - 7") == (["4 - 1 = 3", "3 - 7 = -4"], -4)
    assert solve("3 + 4 * 2") == (["4 * 2 = 8", "3 + 8 = 11"], 11)
    assert solve("-( 3 + 4 ) * 2") == (["3 + 4 = 7", "-(7) = -7", "-7 * 2 = -14"], -14)
    assert solve("2 - -1") == (["2 - -1 = 3"], 3)
    assert solve("( -9 / 9 ) - 6") == (["-9 / 9 = -1", "-1 - 6 = -7"], -7)


def test_solve_refuses_inexact_division_and_non_arithmetic():
    assert solve("7 / 2") is None  # reasoning-gym would floor this to 3
    assert solve("3 / ( 2 - 2 )") is None
    with pytest.raises(ValueError):
        solve("__import__('os')")


def test_example_format_and_compact_prompt():
    example = small().split("validation")[0]
    assert set(example) == {"prompt", "completion", "answer", "source", "num_steps", "question"}
    expression = example["prompt"].removesuffix(" =\n")
    assert example["prompt"] == f"{expression} =\n" and expression in example["question"]
    lines = example["completion"].split("\n")
    assert lines[-1] == f"#### {example['answer']}" and len(lines) == example["num_steps"] + 1
    # chain_sum: one step per operator, so more terms take more steps
    assert example["num_steps"] == len(re.findall(r" [+-] ", expression))


def test_question_prompt_style():
    example = small(prompt_style="question").split("test")[0]
    assert example["prompt"] == example["question"] + "\n"


def test_same_seed_same_examples_other_seed_other_examples():
    a, b, c = small(seed=3), small(seed=3), small(seed=4)
    for name in ("train", "validation", "test"):
        assert a.split(name) == b.split(name)
        assert a.split(name) != c.split(name)


def test_no_train_problem_in_validation_or_test():
    task = small(num_train=2000, sources=["chain_sum", "basic_arithmetic"])
    held_out = {e["prompt"] for name in ("validation", "test") for e in task.split(name)}
    train = task.split("train")
    assert not held_out & {e["prompt"] for e in train}
    assert 1000 < len(train) < 2000  # 1-digit problems repeat, so some train items go
    assert len(task.split("validation")) == 100 and len(task.split("test")) == 100


@pytest.mark.parametrize("source", SOURCES)
def test_every_trace_scores_full_marks_on_its_own_example(source):
    task = small(sources=[source], num_train=200)
    examples = [e for name in ("train", "validation", "test") for e in task.split(name)]
    assert len(examples) > 350
    assert all(task.score(e["completion"], e) == 1.0 for e in examples)
    assert all(e["completion"].endswith(f"\n#### {e['answer']}") for e in examples)


def test_traces_agree_with_reasoning_gym_and_few_are_skipped():
    import reasoning_gym

    task = small(sources=["basic_arithmetic"])
    items = list(reasoning_gym.create_dataset("basic_arithmetic", size=500, seed=1, **task.configs["basic_arithmetic"]))
    solved = [(solve(i["metadata"]["expression"]), i["answer"]) for i in items]
    assert all(s[1] == int(answer) for s, answer in solved if s is not None)
    assert sum(s is None for s, _ in solved) < 25  # only inexact divisions are dropped


def test_rechecks_only_in_train_at_about_the_asked_rate():
    task = small(num_train=1000, recheck_prob=0.25)
    train = task.split("train")
    rechecked = [e for e in train if "check: " in e["completion"]]
    assert 0.15 < len(rechecked) / len(train) < 0.35
    e = rechecked[0]
    steps = e["completion"].split("\n")[: e["num_steps"]]
    assert e["completion"] == "\n".join(steps + [f"check: {s}" for s in steps] + [f"#### {e['answer']}"])
    assert not any("check:" in e["completion"] for n in ("validation", "test") for e in task.split(n))
    assert not any("check:" in e["completion"] for e in small(recheck_prob=0.0).split("train"))


def test_gsm_symbolic_uses_the_question_and_its_worked_solution():
    example = small(sources=["gsm_symbolic"], num_train=10).split("validation")[0]
    assert example["prompt"] == example["question"] + "\n"
    assert example["completion"].count("####") == 1 and example["num_steps"] >= 1


def test_score():
    task = small()
    example = {"answer": "-4", "source": "chain_sum", "question": "4 - 1 - 7 ="}
    assert task.score("4 - 1 = 3\n3 - 7 = -4\n#### -4", example) == 1.0
    assert task.score("#### -4.0", example) == 1.0
    assert task.score("the answer is -4", example) == 1.0
    assert task.score("#### 4", example) == 0.0
    assert task.score("#### -44", example) == 0.0  # reasoning-gym would give partial credit
    assert task.score("I do not know", example) == 0.0


def test_generation_is_fast():
    import time

    start = time.perf_counter()
    task = ReasoningTask()  # the defaults: 20,000 train problems
    assert len(task.split("train")) > 15000
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sources": ["sudoku"]}, "chain_sum, basic_arithmetic, gsm_symbolic"),
        ({"prompt_style": "chatty"}, "compact, question"),
        ({"min_terms": 4, "max_terms": 2}, "min_terms <= max_terms"),
        ({"recheck_prob": 1.5}, "recheck_prob"),
    ],
)
def test_bad_config_is_an_rlx_error(kwargs, message):
    with pytest.raises(RlxError, match=message):
        ReasoningTask(**kwargs)


def test_unknown_split():
    with pytest.raises(RlxError, match="validation"):
        small().split("dev")
