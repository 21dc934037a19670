"""SFT's loss against hand-computed values, and its masking of prompt tokens."""
import math
from types import SimpleNamespace

import pytest
import torch

from rlx.algorithms.sft import SFT
from rlx.data.collate import IGNORE, lm_batch
from rlx.errors import RlxError
from rlx.models import tiny


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the same at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def batch(input_ids, labels):
    ids = torch.tensor(input_ids)
    lab = torch.tensor(labels)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab,
            "num_targets": int((lab[:, 1:] != IGNORE).sum())}


def test_loss_is_token_mean_nll_by_hand():
    # Vocab of 2 with logits [0, ln 3]: p(0) = 1/4, p(1) = 3/4.
    # Sequence [0, 1, 0, 1]; positions 1..3 are predicted: targets 1, 0, 1
    # NLL = -ln(3/4) - ln(1/4) - ln(3/4) = 0.2877 + 1.3863 + 0.2877 = 1.9617; mean over 3 = 0.6539
    state = SimpleNamespace(model=FixedLogits([0.0, math.log(3)]))
    loss, metrics = SFT().loss(batch([[0, 1, 0, 1]], [[0, 1, 0, 1]]), state)
    assert loss.item() == pytest.approx((2 * -math.log(0.75) - math.log(0.25)) / 3, abs=1e-6)
    assert metrics["train/loss"] == loss


def test_masked_prompt_tokens_do_not_count():
    # Only the last target (1) counts: loss = -ln(3/4) = 0.28768
    state = SimpleNamespace(model=FixedLogits([0.0, math.log(3)]))
    loss, _ = SFT().loss(batch([[0, 1, 0, 1]], [[IGNORE, IGNORE, IGNORE, 1]]), state)
    assert loss.item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_make_batch_trains_on_completion_and_eos_only():
    policy = tiny(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    state = SimpleNamespace(model=policy.model, tokenizer=policy.tokenizer)
    b = SFT().make_batch([{"prompt": "1 + 2 =\n", "completion": "#### 3"}], state)
    tok = policy.tokenizer
    targets = b["labels"][0][b["labels"][0] != IGNORE].tolist()
    assert targets == tok("#### 3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert b["num_targets"] == len(targets)  # every completion token is predicted from a prompt token


def test_text_examples_train_on_every_token_and_pad_is_ignored():
    policy = tiny(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    b = lm_batch([{"text": "ab"}, {"text": "abcd"}], policy.tokenizer, max_length=16)
    # corpus chunks are arbitrary cuts, so no EOS: "ab" = 2 tokens padded to 4; "abcd" = 4
    assert b["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert (b["labels"][0, 2:] == IGNORE).all() and (b["labels"][1] != IGNORE).all()


# ---------------------------------------------------------------------------- per-sample weighting


class Fixed:
    """A weighting that returns given weights and records what it was handed."""

    def __init__(self, w):
        self.w, self.seen, self.metrics = torch.tensor(w), [], {"weight/mean": sum(w) / len(w)}

    def __call__(self, losses, ids):
        self.seen.append((losses.clone(), ids))
        return self.w

    def state_dict(self):
        return {"w": self.w.tolist()}

    def load_state_dict(self, state):
        self.w = torch.tensor(state["w"])


def two_rows():
    # Row 0 predicts targets 1, 0, 1 (3 tokens); row 1 only its last target, 1 (positions 1-2 masked).
    return batch([[0, 1, 0, 1], [0, 1, 0, 1]], [[0, 1, 0, 1], [IGNORE, IGNORE, IGNORE, 1]])


def test_uniform_weighting_is_the_per_sample_mean_by_hand():
    from rlx.weighting import Uniform

    # p(0) = 1/4, p(1) = 3/4: row 0 = (2 ln(4/3) + ln 4) / 3 = 0.65393, row 1 = ln(4/3) = 0.28768;
    # per-sample mean (0.65393 + 0.28768) / 2 = 0.47081 (the token mean would be 4 tokens: 0.56237)
    state = SimpleNamespace(model=FixedLogits([0.0, math.log(3)]))
    row0, row1 = (2 * math.log(4 / 3) + math.log(4)) / 3, math.log(4 / 3)
    loss, metrics = SFT(weighting=Uniform()).loss(two_rows(), state)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert metrics["train/sample_loss"] == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert metrics["weight/mean"] == metrics["weight/min"] == metrics["weight/max"] == 1.0
    token_mean, _ = SFT().loss(two_rows(), state)
    assert token_mean.item() == pytest.approx((3 * row0 + row1) / 4, abs=1e-6)


def test_weights_multiply_each_samples_mean_loss_and_reach_the_metrics():
    state = SimpleNamespace(model=FixedLogits([0.0, math.log(3)]))
    fixed = Fixed([2.0, 0.5])
    b = two_rows()
    b["ids"] = ["a", "b"]
    loss, metrics = SFT(weighting=fixed).loss(b, state)
    row0, row1 = (2 * math.log(4 / 3) + math.log(4)) / 3, math.log(4 / 3)
    assert loss.item() == pytest.approx((2.0 * row0 + 0.5 * row1) / 2, abs=1e-6)
    losses, ids = fixed.seen[0]
    assert losses.tolist() == pytest.approx([row0, row1], abs=1e-6) and not losses.requires_grad and ids == ["a", "b"]
    assert metrics["weight/mean"] == 1.25


def test_equal_length_samples_weigh_alike_under_both_means():
    # Every row has as many targets, so the per-sample mean IS the token mean: loss and gradient agree.
    from rlx.weighting import Uniform

    policy = tiny(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    state = SimpleNamespace(model=policy.model, tokenizer=policy.tokenizer)
    examples = [{"prompt": "1 + 2 =\n", "completion": "#### 3"}, {"prompt": "9 - 1 - 2 =\n", "completion": "#### 6"}]
    grads = []
    for algo in (SFT(), SFT(weighting=Uniform())):
        policy.model.zero_grad()
        loss, _ = algo.loss(algo.make_batch(examples, state), state)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in policy.model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_weighted_batches_count_samples_and_carry_ids():
    from rlx.weighting import Uniform

    policy = tiny(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    state = SimpleNamespace(model=policy.model, tokenizer=policy.tokenizer)
    examples = [{"prompt": "1 + 2 =\n", "completion": "#### 3", "id": 7}, {"prompt": "4 =\n", "completion": "#### 4", "id": 9}]
    plain, weighted = SFT().make_batch(examples, state), SFT(weighting=Uniform()).make_batch(examples, state)
    assert weighted["num_targets"] == 2 and weighted["num_tokens"] == plain["num_targets"] and weighted["ids"] == [7, 9]
    assert "ids" not in plain and "num_tokens" not in plain
    assert SFT(weighting=Uniform()).make_batch([{"prompt": "1 =\n", "completion": "#### 1"}], state)["ids"] is None


def test_weighting_none_builds_the_unweighted_sft_and_state_carries_a_weighting():
    from rlx.config import build
    from tests.support import small_config

    assert build(small_config().algo).weighting is None
    with pytest.raises(RlxError, match="no _target_"):
        SFT(weighting={"alpha": 2})
    algo, other = SFT(weighting=Fixed([1.0, 3.0])), SFT(weighting=Fixed([0.0, 0.0]))
    other.load_state_dict(algo.state_dict())
    assert other.weighting.w.tolist() == [1.0, 3.0] and SFT().state_dict() == {}


def test_a_weighted_run_averages_micro_batches_by_samples(tmp_path):
    # 1 x 4 and 2 x 2 see the same four samples in the first step (the stream's order), so with
    # samples as the unit both take the same gradient and end on the same weights.
    from safetensors.torch import load_file

    from rlx.tasks import run_training
    from tests.support import small_config

    uniform = ["+weighting._target_=rlx.weighting.Uniform", "trainer.max_steps=1", "trainer.eval_samples=2"]
    run_training(small_config(*uniform), tmp_path / "one")
    run_training(small_config(*uniform, "trainer.micro_batch_size=2", "trainer.grad_accum=2"), tmp_path / "two")
    a, b = (load_file(tmp_path / r / "checkpoints/last/model.safetensors") for r in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
