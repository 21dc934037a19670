"""data=reasoning_hard: easy and hard problems, long-tailed removable re-checks, per-difficulty
evaluation, and its own SFT base (model=tiny_sft_hard)."""
import os
import statistics
import subprocess
import sys

import pytest

from rlx.base import base_dir
from rlx.config import build, compose_config
from rlx.data.reasoning import ReasoningTask, extract_answer
from rlx.errors import RlxError
from rlx.evaluate import evaluate
from rlx.models import tiny
from rlx.paths import REPO_ROOT
from tests.support import TINY


@pytest.fixture(scope="module")
def task():
    cfg = compose_config("train", ["data=reasoning_hard", "data.num_train=3000", "data.num_validation=200",
                                   "data.num_test=10"])
    return build(cfg.data)


def test_the_hard_share_and_sizes(task):
    train, val = task.split("train"), task.split("validation")
    assert {ex["difficulty"] for ex in train} == {"easy", "hard"}
    assert sum(ex["difficulty"] == "hard" for ex in val) == 80  # 40% of 200, held out exactly
    steps = {d: [ex["num_steps"] for ex in train if ex["difficulty"] == d] for d in ("easy", "hard")}
    assert max(steps["easy"]) <= 2 and min(steps["hard"]) >= 4  # 2-3 terms against 5-7 terms


def test_recheck_passes_have_a_long_tail_and_are_removable(task):
    train = task.split("train")
    passes = [ex["completion"].count("check: ") // ex["num_steps"] for ex in train]
    share = lambda k: sum(p >= k for p in passes) / len(passes)
    assert 0.25 < share(1) < 0.35 and 0.11 < share(2) < 0.19 and 0.04 < share(3) < 0.11  # 0.3, 0.15, 0.075
    assert max(passes) == 3  # recheck_max_passes
    lengths = [len(ex["prompt"]) + len(ex["completion"]) for ex in train]
    assert max(lengths) > 5 * statistics.median(lengths) and max(lengths) <= 512  # a tail inside the context
    for ex in train[:300]:  # dropping every re-check leaves a trace that is still right
        short = "\n".join(line for line in ex["completion"].split("\n") if not line.startswith("check: "))
        assert extract_answer(short) == ex["answer"] and task.score(short, ex) == 1.0


def test_folded_traces_halve_the_lines_and_keep_every_line_true(task):
    """data.fold_prob: that share of training traces writes each pair of steps as one line. Each
    folded line is a true sum (checked by hand arithmetic, not by the generator), the answer line is
    the unfolded trace's, the scorer accepts it, re-checks repeat the folded lines, held-out splits
    and fold_prob=0 are untouched."""
    sizes = ["data=reasoning_hard", "data.num_train=3000", "data.num_validation=200", "data.num_test=10"]
    folded = build(compose_config("train", [*sizes, "data.fold_prob=0.5"]).data)
    plain, train = task.split("train"), folded.split("train")
    assert [ex["prompt"] for ex in plain] == [ex["prompt"] for ex in train]
    assert folded.split("validation") == task.split("validation")
    changed = 0
    for before, after in zip(plain, train):
        steps = [line for line in after["completion"].split("\n")[:-1] if not line.startswith("check: ")]
        assert after["completion"].split("\n")[-1] == before["completion"].split("\n")[-1]  # the answer line
        assert task.score(after["completion"], after) == 1.0
        for line in steps:  # "a - b + c = r": add up the signed terms
            lhs, rhs = line.split(" = ")
            tokens = lhs.split(" ")
            total = int(tokens[0]) + sum(int(n) if op == "+" else -int(n) for op, n in zip(tokens[1::2], tokens[2::2]))
            assert total == int(rhs), line
        if len(steps) < after["num_steps"]:
            changed += 1
            assert len(steps) == (after["num_steps"] + 1) // 2
            checks = [line[len("check: "):] for line in after["completion"].split("\n") if line.startswith("check: ")]
            assert set(checks) <= set(steps)
    foldable = sum(ex["num_steps"] >= 2 for ex in train)  # a one-step trace has nothing to fold
    assert 0.45 < changed / foldable < 0.55
    assert build(compose_config("train", [*sizes, "data.fold_prob=0"]).data).split("train") == plain


def test_default_reasoning_data_has_no_difficulty_and_one_pass_at_most():
    t = ReasoningTask(num_train=300, num_validation=8, num_test=8)
    assert all("difficulty" not in ex for ex in t.split("train"))
    assert max(ex["completion"].count("check: ") // ex["num_steps"] for ex in t.split("train")) == 1


def test_bad_hard_settings_are_one_clear_line():
    with pytest.raises(RlxError, match="recheck_more"):
        ReasoningTask(recheck_more=1.0)
    with pytest.raises(RlxError, match="hard_fraction"):
        ReasoningTask(hard_fraction=1.5)
    with pytest.raises(RlxError, match="unknown SFT base"):
        base_dir("tiny-sft-bogus")


def test_evaluation_reports_each_difficulty(task):
    policy = tiny(**TINY, device="cpu")
    m = evaluate(policy.model, policy.tokenizer, task, "validation", 20, 10, 6, 128)
    assert {"eval/accuracy_easy", "eval/accuracy_hard", "eval/response_len_easy", "eval/response_len_hard"} <= set(m)
    n = {d: sum(ex["difficulty"] == d for ex in task.split("validation")[:20]) for d in ("easy", "hard")}
    assert m["eval/accuracy"] == pytest.approx((m["eval/accuracy_easy"] * n["easy"]
                                                + m["eval/accuracy_hard"] * n["hard"]) / 20)


def test_the_hard_base_builds_under_its_own_name(tmp_path):
    env = {**os.environ, "RLX_CACHE": str(tmp_path)}
    small = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
             "data.num_train=64", "data.num_validation=4", "data.num_test=4", "trainer.max_steps=2",
             "trainer.eval_samples=2", "trainer.eval_max_new_tokens=4", "trainer.progress=false"]
    code = f"from rlx.base import ensure_base; print('BASE', ensure_base({small!r}, name='tiny-sft-hard'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, text=True, capture_output=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"BASE {tmp_path}/models/tiny-sft-hard" in done.stdout and "tiny-sft-hard" in done.stderr
    assert (tmp_path / "models/tiny-sft-hard/config.json").exists()
    assert not (tmp_path / "models/tiny-sft").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "models/tiny-sft-hard")


def test_the_fold_base_continues_from_the_hard_base(tmp_path):
    """tiny-sft-fold is SFT on folded traces starting from tiny-sft-hard's weights (built first)."""
    env = {**os.environ, "RLX_CACHE": str(tmp_path)}
    small = ["data.num_train=64", "data.num_validation=4", "data.num_test=4", "trainer.max_steps=2",
             "trainer.eval_samples=2", "trainer.eval_max_new_tokens=4", "trainer.progress=false"]
    shape = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64"]
    code = (f"from rlx.base import ensure_base; ensure_base({[*shape, *small]!r}, name='tiny-sft-hard'); "
            f"ensure_base({small!r}, name='tiny-sft-fold')")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, text=True, capture_output=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    from transformers import AutoConfig

    hard, fold = (AutoConfig.from_pretrained(tmp_path / f"models/tiny-sft-{n}") for n in ("hard", "fold"))
    assert fold.hidden_size == hard.hidden_size == 32  # the small hard base's shape, not tiny's default
    assert "fold_prob: 0.3" in (tmp_path / "models/tiny-sft-fold/rlx_config.yaml").read_text()


def test_step_lines_counts_a_skipped_step_as_a_shortcut_and_a_recheck_as_none():
    """step_lines, the benchmarks' shortcut count: a trace with fewer arithmetic lines than the problem's steps
    skipped one; re-check lines do not count as steps, so a re-checked short trace is still short."""
    from rlx.data.reasoning import step_lines

    task = build(compose_config("train", ["data=reasoning_hard", "data.num_train=8", "data.num_validation=64",
                                          "data.num_test=4"]).data)
    hard = next(ex for ex in task.split("validation") if ex["difficulty"] == "hard")
    full = hard["completion"].split("\n")
    assert step_lines(hard["completion"]) == hard["num_steps"]
    merged = "\n".join(full[1:])  # the first step folded into the second: one line short, same answer
    assert step_lines(merged) == hard["num_steps"] - 1
    rechecked = merged + "\n" + "\n".join(f"check: {line}" for line in full[1:-1])
    assert step_lines(rechecked) == hard["num_steps"] - 1
