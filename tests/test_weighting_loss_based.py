"""weighting=loss_based (arXiv 2502.06733) against the paper note's hand values, each strategy's shape
worked by hand, its limits (equal losses, a large temperature, the warmup: the sample-mean loss), one-line
errors, a loop run on Shakespeare and its exact resume."""
import json
import math

import pytest
import torch

from rlx.errors import RlxError
from rlx.weighting.loss_based import LossBased, normalize, softmax_weights
from tests.support import small_config, straight_and_resumed

# Shakespeare chunks cut to 32 characters, a tiny model: a step takes milliseconds.
TEXT = ["data=shakespeare", "data.chunk_chars=64", "algo.max_length=32", "trainer.eval_max_length=32",
        "trainer.micro_batch_size=4", "trainer.lr_scheduler=constant"]
LOSSES = torch.tensor([1.0, 2.0, 3.0, 4.0])


def softmax(s):
    e = [math.exp(x - max(s)) for x in s]
    return [x / sum(e) for x in e]


def test_note_check_1_linupper_by_hand():
    # l~ = 2 l / 3 - 5 / 3 = [-1, -1/3, 1/3, 1]; LinUpper s = min(l~ + 1, 1) = [0, 2/3, 1, 1]
    # softmax: e^0, e^(2/3), e, e = 1, 1.9477, 2.7183, 2.7183; sum 8.3843 -> [0.1193, 0.2323, 0.3242, 0.3242]
    # weighted loss 0.1193 + 2 (0.2323) + 3 (0.3242) + 4 (0.3242) = 2.8534
    torch.testing.assert_close(normalize(LOSSES), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    w = LossBased()(LOSSES, None)
    torch.testing.assert_close(w / 4, torch.tensor([0.1193, 0.2323, 0.3242, 0.3242]), atol=1e-4, rtol=0)
    assert (w * LOSSES).mean().item() == pytest.approx(2.8534, abs=1e-4)  # SFT's mean of w l = the paper's sum
    assert w.sum().item() == pytest.approx(4.0)


@pytest.mark.parametrize("strategy, scores", [
    ("quadratic", [0, 8 / 9, 8 / 9, 0]),     # 1 - l~^2: both extremes down -> [0.1457, 0.3543, 0.3543, 0.1457]
    ("extremes", [1, 1 / 3, 1 / 3, 1]),      # |l~|: both extremes up -> [0.3304, 0.1696, 0.1696, 0.3304]
    ("uniform", [-1, -1 / 3, 1 / 3, 1]),     # l~ itself: rising, not flat -> [0.0708, 0.1378, 0.2685, 0.5229]
])
def test_each_strategy_shape_by_hand(strategy, scores):
    expected = {"quadratic": [0.1457, 0.3543, 0.3543, 0.1457], "extremes": [0.3304, 0.1696, 0.1696, 0.3304],
                "uniform": [0.0708, 0.1378, 0.2685, 0.5229]}[strategy]
    assert softmax(scores) == pytest.approx(expected, abs=1e-4)  # the hand arithmetic itself
    torch.testing.assert_close(softmax_weights(LOSSES, strategy), torch.tensor(expected), atol=1e-4, rtol=0)


def test_linupper_is_flat_above_the_midpoint_and_rises_below():
    losses = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])  # midpoint 2.0
    w = LossBased()(losses, None)
    assert torch.allclose(w[3:], w[3:].max().expand(4))  # the upper half: one bounded max weight
    assert (w[:4].diff() > 0).all()                      # the lower half: rising with the loss
    assert w[3].item() / w[0].item() == pytest.approx(math.e)  # s = 0 at l_min, 1 at the midpoint


def test_weights_ignore_the_losses_scale_and_offset():
    # the min/max normalization: a x + b (a > 0) gives the same l~, so the same weights
    for strategy in ("linupper", "quadratic", "extremes", "uniform"):
        torch.testing.assert_close(softmax_weights(LOSSES, strategy), softmax_weights(7 * LOSSES + 3, strategy))


def test_equal_losses_weigh_uniformly():
    # l_max - l_min = 0: the 1e-6 guard makes every l~ 0, so w = 1 (no NaN from a division by zero)
    for strategy in ("linupper", "quadratic", "extremes", "uniform"):
        w = LossBased(strategy)(torch.full((5,), 2.7), None)
        assert torch.equal(w, torch.ones(5))
    assert torch.equal(LossBased()(torch.tensor([3.0]), None), torch.ones(1))  # a batch of one


def test_temperature_limits():
    assert torch.allclose(LossBased(r=1e9)(LOSSES, None), torch.ones(4))  # r -> inf: uniform
    w = LossBased(r=1e-3)(LOSSES, None)  # r -> 0: LinUpper's mass splits evenly over the flat upper half
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 2.0, 2.0]), atol=1e-6, rtol=0)


def test_warmup_is_uniform_then_reweights_and_counts_in_the_state():
    weighting = LossBased(warmup=2)
    assert torch.equal(weighting(LOSSES, None), torch.ones(4))
    assert weighting.metrics["weight/entropy"] == pytest.approx(1.0)
    assert torch.equal(weighting(LOSSES, None), torch.ones(4))
    assert not torch.allclose(weighting(LOSSES, None), torch.ones(4))
    assert weighting.state_dict() == {"calls": 3}
    hot = LossBased(warmup=1, warmup_r=100.0)  # the LLaMA code's form: a high temperature, nearly uniform
    torch.testing.assert_close(hot(LOSSES, None) / 4, torch.tensor(softmax([0, 2 / 300, 1 / 100, 1 / 100])))


def test_flat_weights_give_the_sample_mean_loss():
    # SFT's weighted loss with w = 1 is mean_i l_i, the per-sample-mean loss of plain training
    losses = torch.tensor([0.3, 1.7, 2.2, 0.9], requires_grad=True)
    w = LossBased(warmup=1)(losses.detach(), None)
    (w * losses).mean().backward()
    torch.testing.assert_close(losses.grad, torch.full((4,), 0.25))


def test_metrics_by_hand():
    weighting = LossBased()
    weighting(LOSSES, None)
    p = [0.1193, 0.2323, 0.3242, 0.3242]
    entropy = -sum(x * math.log(x) for x in p) / math.log(4)  # 0.9544
    assert weighting.metrics["weight/entropy"] == pytest.approx(entropy, abs=1e-3)
    assert weighting.metrics["weight/max"] == pytest.approx(4 * 0.3242, abs=1e-3)
    assert weighting.metrics["weight/min"] == pytest.approx(4 * 0.1193, abs=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "mid"}, "choose one of linupper"),
    ({"delta": 0}, "delta must be > 0"),
    ({"r": -1}, "temperature must be > 0"),
    ({"warmup_r": 0}, "temperature must be > 0"),
    ({"warmup": -1}, "must be >= 0"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(RlxError, match=message):
        LossBased(**kwargs)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loop_run_on_shakespeare_reweights(tmp_path):
    from rlx.tasks import run_training

    summary = run_training(small_config(*TEXT, "weighting=loss_based", "trainer.max_steps=3"), tmp_path)
    logged = [r for r in rows(tmp_path) if "weight/entropy" in r]
    assert len(logged) == 3 and all(0 < r["weight/entropy"] < 1 for r in logged)  # not flat: losses differ
    assert all(r["weight/max"] <= 4 * math.e / (math.e + 3) + 1e-5 for r in logged)  # LinUpper's bound at B = 4
    assert math.isfinite(summary["train/loss"])


def test_loop_large_temperature_equals_warmup_uniform_training(tmp_path):
    # r = 1e9 (weights 1 to ~1e-9) and a warmup over the whole run (weights exactly 1) train alike
    from safetensors.torch import load_file

    from rlx.tasks import run_training

    for name, extra in (("hot", "weighting.r=1e9"), ("warm", "weighting.warmup=100")):
        run_training(small_config(*TEXT, "weighting=loss_based", extra, "trainer.max_steps=2"), tmp_path / name)
    hot, warm = (load_file(tmp_path / n / "checkpoints/last/model.safetensors") for n in ("hot", "warm"))
    for key in hot:
        torch.testing.assert_close(hot[key], warm[key], atol=1e-6, rtol=0, msg=key)


def test_resume_is_exact_across_the_warmup(tmp_path):
    # warmup 3 of 4 steps, cut at 2: only a resumed call counter weighs step 4 as the straight run does
    full, resumed, w_full, w_cut = straight_and_resumed(tmp_path, [*TEXT, "weighting=loss_based", "weighting.warmup=3"])
    for key in w_full:
        assert torch.equal(w_full[key], w_cut[key]), key
    assert full["train/loss"] == resumed["train/loss"]
