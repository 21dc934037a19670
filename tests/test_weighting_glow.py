"""GLOW's weights on the paper note's hand values, first visits and equal gains as uniform
weighting, its history keyed by id, exact resume of that history, and loop runs."""
import math
from types import SimpleNamespace

import pytest
import torch

from rlx.algorithms.sft import SFT
from rlx.errors import RlxError
from rlx.tasks import run_training
from rlx.weighting import Uniform
from rlx.weighting.glow import GLOW, glow_weights
from tests.support import small_config, straight_and_resumed


def test_the_notes_weights_of_a_gain():
    # alpha 2, beta 10 (the note): gain 0 -> 1.0; 0.1 -> 2(1 - sigma(1)) = 0.5379; -0.1 -> 1.4621;
    # 0.5 -> 2(1 - sigma(5)) = 0.0134, clamped to 0.5
    w = glow_weights(torch.tensor([0.0, 0.1, -0.1, 0.5]), 2.0, 10.0, 0.5, 5.0)
    assert w.tolist() == pytest.approx([1.0, 0.5379, 1.4621, 0.5], abs=1e-4)
    assert glow_weights(torch.tensor([0.5]), 2.0, 10.0, 0.0, 5.0).item() == pytest.approx(0.0134, abs=1e-4)
    # a large regression saturates at alpha = 2, and alpha = 8 meets the upper clamp 5
    assert glow_weights(torch.tensor([-3.0]), 2.0, 10.0, 0.5, 5.0).item() == pytest.approx(2.0, abs=1e-6)
    assert glow_weights(torch.tensor([-3.0]), 8.0, 10.0, 0.5, 5.0).item() == 5.0


def test_second_visit_weighs_by_the_gain_since_the_first():
    glow = GLOW()
    first = glow(torch.tensor([1.0, 2.0, 0.5]), ["a", "b", "c"])
    assert first.tolist() == [1.0, 1.0, 1.0] and glow.metrics["weight/revisited"] == 0.0
    # a: 1.0 -> 0.9 (gain 0.1), b: 2.0 -> 2.1 (gain -0.1), c: 0.5 -> 0.0 (gain 0.5), d: first visit
    w = glow(torch.tensor([0.9, 2.1, 0.0, 3.0]), ["a", "b", "c", "d"])
    assert w.tolist() == pytest.approx([0.5379, 1.4621, 0.5, 1.0], abs=1e-4)
    assert glow.metrics["weight/revisited"] == 0.75 and glow.metrics["weight/gain"] == pytest.approx(0.5 / 3, abs=1e-6)
    assert glow.prev_loss == pytest.approx({"a": 0.9, "b": 2.1, "c": 0.0, "d": 3.0})


class Logits(torch.nn.Module):
    """A 'model' whose next-token logits are fixed per row (so rows have different losses)."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.device = torch.nn.Parameter(torch.tensor(rows)), torch.device("cpu")

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.rows[:, None, :].expand(-1, input_ids.shape[1], -1))


def batch(ids):
    x = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]])
    labels = x.clone()
    labels[2, :2] = -100  # rows with 3, 3 and 1 targets: a per-sample mean differs from a token mean
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels, "num_targets": 3, "ids": ids}


def test_first_epoch_loss_is_exactly_the_unweighted_sample_mean():
    state = SimpleNamespace(model=Logits([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]))
    glow_loss, metrics = SFT(weighting=GLOW()).loss(batch(["x", "y", "z"]), state)
    uniform_loss, _ = SFT(weighting=Uniform()).loss(batch(["x", "y", "z"]), state)
    assert torch.equal(glow_loss, uniform_loss) and metrics["weight/mean"] == 1.0


def test_equal_gains_weigh_uniformly():
    # Every sample's loss falls by the same amount d: one weight for all, so GLOW's loss is w(d) times
    # the uniform per-sample mean (same gradient direction); d = 0 is uniform weighting exactly.
    glow = GLOW()
    losses = torch.tensor([1.5, 0.7, 2.2])
    glow(losses, [1, 2, 3])
    for d, expected in [(0.05, 2 * (1 - 1 / (1 + math.exp(-0.5)))), (0.0, 1.0)]:
        losses = losses - d
        w = glow(losses, [1, 2, 3])
        assert w.tolist() == pytest.approx([expected] * 3, abs=1e-6)


def test_glow_without_ids_is_one_clear_error():
    with pytest.raises(RlxError, match="data=reasoning_unfiltered"):
        GLOW()(torch.ones(2), None)
    with pytest.raises(RlxError, match="alpha > 0"):
        GLOW(alpha=0)
    with pytest.raises(RlxError, match="w_min <= w_max"):
        GLOW(w_min=2, w_max=1)


def test_history_round_trips_through_state_dict():
    glow, other = GLOW(), GLOW()
    glow(torch.tensor([1.0, 2.0]), ["a", "b"])
    other.load_state_dict(glow.state_dict())
    assert torch.equal(other(torch.tensor([0.9, 2.1]), ["a", "b"]), glow(torch.tensor([0.9, 2.1]), ["a", "b"]))


# Six problems, five once held-out copies are dropped: ten examples, two micro-batches of four an
# epoch (the tail of two is dropped), so steps 3-6 revisit samples and the cut at 3 falls mid-history.
UNFILTERED = ["data=reasoning_unfiltered", "weighting=glow", "data.num_train=6", "trainer.lr_scheduler=constant",
              "trainer.eval_samples=2"]


def test_glow_resumes_exactly_across_an_epoch(tmp_path):
    full, resumed, w_full, w_resumed = straight_and_resumed(tmp_path, UNFILTERED, steps=6, cut=3)
    assert full["train/loss"] == resumed["train/loss"] and full["weight/mean"] == resumed["weight/mean"]
    assert full["weight/revisited"] == 1.0  # the last step revisits only samples seen before
    for k in w_full:
        assert torch.equal(w_full[k], w_resumed[k]), k
    maps = [torch.load(tmp_path / r / "checkpoints/last/trainer_state.pt", weights_only=False)["algo"]["weighting"]
            for r in ("full", "cut")]
    visited = set(maps[0]["prev_loss"])
    assert maps[0] == maps[1] and 8 < len(visited) <= 10 and {i[-1] for i in visited} == {"+", "-"}


def test_glow_on_data_without_ids_stops_with_one_line(tmp_path):
    with pytest.raises(RlxError, match="has none"):
        run_training(small_config("weighting=glow", "trainer.max_steps=1"), tmp_path)
