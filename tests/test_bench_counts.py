"""The wall-clock figures of the length benchmarks count the responses their own settings produce
(a script that borrows another's helpers must not borrow its batch sizes)."""
import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name):
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


def _run(method, steps, finished=None, overrides=()):
    means = {"rl/rollout_s": 1.0, **({"rl/finished": finished} if finished else {})}
    return {"method": method, "steps": steps, "overrides": list(overrides),
            "curve": [{"time_s": 100.0, "tokens": 1000}], "training_means": means}


@pytest.mark.parametrize("name", ["bench_length_rl", "bench_length_hard"])
def test_ppo_responses_are_prompts_times_samples_per_rollout(name):
    bench = _script(name)
    rollouts = 20
    r = _run("ppo", rollouts * bench.MINIBATCHES)
    figures = bench.throughput(r)
    assert figures["responses"] == rollouts * bench.PROMPTS * 8
    assert figures["generation_share"] == pytest.approx(rollouts * 1.0 / 100.0)


def test_tppo_counts_what_finished_and_samples_follow_the_overrides():
    bench = _script("bench_length_hard")
    assert bench.throughput(_run("tppo", 30, finished=60.0))["responses"] == 30 * 60.0
    r = _run("ppo", 2 * bench.MINIBATCHES, overrides=["algo.samples_per_prompt=4"])
    assert bench.throughput(r)["responses"] == 2 * bench.PROMPTS * 4


def test_hard_task_counts_a_skipped_step_as_a_shortcut_and_a_recheck_as_none():
    """bench_hard_task's shortcut share: a trace with fewer arithmetic lines than the problem's steps
    skipped one; re-check lines do not count as steps, so a re-checked short trace is still short."""
    from rlx.config import build, compose_config

    step_lines = _script("bench_hard_task").step_lines
    task = build(compose_config("train", ["data=reasoning_hard", "data.num_train=8", "data.num_validation=64",
                                          "data.num_test=4"]).data)
    hard = next(ex for ex in task.split("validation") if ex["difficulty"] == "hard")
    full = hard["completion"].split("\n")
    assert step_lines(hard["completion"]) == hard["num_steps"]
    merged = "\n".join(full[1:])  # the first step folded into the second: one line short, same answer
    assert step_lines(merged) == hard["num_steps"] - 1
    rechecked = merged + "\n" + "\n".join(f"check: {line}" for line in full[1:-1])
    assert step_lines(rechecked) == hard["num_steps"] - 1
