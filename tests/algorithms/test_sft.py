"""SFT's loss against hand-computed values, and its masking of prompt tokens."""
import math
from types import SimpleNamespace

import pytest
import torch

from rlx.algorithms.sft import SFT
from rlx.data.collate import IGNORE, lm_batch
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
