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

