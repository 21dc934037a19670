"""SoliReward's BT with win-tie (arXiv 2512.22170) in algo=rm: the paper note's sanity values, the
tie loss's symmetry and its equal-and-opposite gradient, the plain-BT limit bit for bit, the BCE
anchor by hand, the metrics, and one loop run on pairs with ties."""
import json
import math

import pytest
import torch

from rlx.algorithms.rm import RM, bradley_terry_loss, pointwise_bce, win_tie_loss
from rlx.errors import RlxError
from rlx.tasks import run_training
from tests.support import small_config


def t(*xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def win(d, m):
    return win_tie_loss(t(d), t(0.0), torch.tensor([False]), margin=m).item()


def tie(d, m):
    return win_tie_loss(t(d), t(0.0), torch.tensor([True]), margin=m).item()


def test_win_pairs_match_the_note():
    # d = 4: m = 3 -> softplus(-1) = 0.313262; m = 0 -> softplus(-4) = 0.018150
    assert win(4.0, 3.0) == pytest.approx(0.313262, abs=1e-6)
    assert win(4.0, 0.0) == pytest.approx(0.018150, abs=1e-6)


def test_tie_pairs_match_the_note():
    # d = 0: 2 softplus(m): m = 3 -> 6.097175, m = 0 -> 2 ln 2 = 1.386294
    assert tie(0.0, 3.0) == pytest.approx(6.097175, abs=1e-6)
    assert tie(0.0, 0.0) == pytest.approx(1.386294, abs=1e-6)
    # d = 1: softplus(m - 1) + softplus(m + 1): m = 3 -> 6.145078, m = 0 -> 1.626523
    assert tie(1.0, 3.0) == pytest.approx(6.145078, abs=1e-6)
    assert tie(1.0, 0.0) == pytest.approx(1.626523, abs=1e-6)


def test_tie_loss_is_symmetric_grows_with_the_gap_and_is_flat_at_zero():
    for m in (0.0, 1.0, 3.0):
        values = [tie(d, m) for d in (0.0, 0.5, 1.0, 2.0, 5.0)]
        assert values == sorted(values) and len(set(values)) == 5
        for d in (0.5, 1.0, 2.0, 5.0):
            assert tie(-d, m) == pytest.approx(tie(d, m), rel=1e-12)
        d = t(0.0, grad=True)
        win_tie_loss(d, t(0.0), torch.tensor([True]), margin=m).sum().backward()
        assert d.grad.item() == pytest.approx(0.0, abs=1e-12)  # dL/dd = 0 at d = 0


def test_tie_gradient_is_equal_and_opposite():
    # dL/dr1 = -sigmoid(m - d) + sigmoid(m + d); at d = 1, m = 0: -0.268941 + 0.731059 = 0.462117
    r1, r2 = t(2.0, -1.0, grad=True), t(1.0, 0.5, grad=True)
    win_tie_loss(r1, r2, torch.tensor([True, True])).sum().backward()
    assert r1.grad[0].item() == pytest.approx(-1 / (1 + math.e) + 1 / (1 + math.exp(-1)), abs=1e-9)
    assert torch.allclose(r1.grad, -r2.grad, atol=0)  # the pair's mean score gets no gradient


def test_no_ties_and_no_margin_is_bradley_terry_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    plain, _ = bradley_terry_loss(r1, r2)
    assert torch.equal(win_tie_loss(r1, r2, torch.zeros(64, dtype=torch.bool)), plain)


def test_label_smoothing_by_hand():
    # eps = 0.1, d = 1, m = 0: 0.9 softplus(-1) + 0.1 softplus(1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    loss = win_tie_loss(t(1.0), t(0.0), torch.tensor([False]), label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.413262, abs=1e-6)


def test_mixed_batch_uses_each_pairs_own_loss_and_coefficients():
    # pair 0 win d = 4 (0.018150) x bt_coef 2; pair 1 tie d = 1 (1.626523) x tie_coef 0.5
    losses = win_tie_loss(t(4.0, 1.0), t(0.0, 0.0), torch.tensor([False, True]), bt_coef=2.0, tie_coef=0.5)
    assert losses.tolist() == pytest.approx([0.036300, 0.813262], abs=1e-6)


def test_bce_anchor_by_hand():
    # r = 0 against either label: ln 2; r = 2 labelled pass: softplus(-2) = 0.126928; labelled fail: softplus(2)
    bce = pointwise_bce(t(0.0, 2.0), t(0.0, 2.0), torch.tensor([True, True]), torch.tensor([False, False]))
    assert bce.tolist() == pytest.approx([math.log(2), (0.126928 + 2.126928) / 2], abs=1e-6)


class _Tok:
    eos_token_id = 0


class _State:
    model, tokenizer = None, _Tok()


def test_loss_and_metrics_on_given_scores(monkeypatch):
    # 2 win pairs (d = 1, -1) and 1 pass-pass tie (d = 2): scores are given, not computed by a model
    chosen, rejected = t(1.0, 0.0, 3.0), t(0.0, 1.0, 1.0)
    monkeypatch.setattr("rlx.algorithms.rm.sequence_reward", lambda *a: torch.cat([chosen, rejected]))
    batch = {"input_ids": None, "attention_mask": None, "tie": torch.tensor([False, False, True]),
             "chosen_pass": torch.tensor([True, True, True]), "rejected_pass": torch.tensor([False, False, True])}
    loss, metrics = RM(loss="bt_ties").loss(batch, _State())
    # (softplus(-1) + softplus(1) + [softplus(-2) + softplus(2)]) / 3 = (0.313262 + 1.313262 + 2.253856) / 3
    assert loss.item() == pytest.approx((0.313262 + 1.313262 + 2.253856) / 3, abs=1e-6)
    assert metrics["rm/accuracy"] == 0.5 and metrics["rm/margin"] == 0.0  # wins only
    assert metrics["rm/tie_gap"] == pytest.approx(2.0)
    # passing items: 1, 0, 3 (chosen) and 1 (the tie's second): sample std of [1, 0, 3, 1] = sqrt(1.5833)
    assert metrics["rm/pass_std"] == pytest.approx(math.sqrt(((1 - 1.25) ** 2 * 2 + 1.25**2 + 1.75**2) / 3), rel=1e-6)


def test_bad_settings_are_clear_errors():
    with pytest.raises(RlxError, match="algo.loss"):
        RM(loss="ties")
    with pytest.raises(RlxError, match="label_smoothing"):
        RM(label_smoothing=0.5)
    with pytest.raises(RlxError, match="bce_coef"):
        RM(bce_coef=-1.0)


def test_bt_ties_runs_in_the_loop_on_pairs_with_ties(tmp_path):
    cfg = small_config("algo=rm", "algo.loss=bt_ties", "data.ties=0.25", "data.num_train=32", "data.num_validation=4",
                       "data.num_test=4", "trainer.max_steps=2", "trainer.micro_batch_size=8")
    run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    assert rows and {"rm/accuracy", "rm/tie_gap", "rm/pass_std"} <= set(rows[0])
    assert all(math.isfinite(r["train/loss"]) and r["rm/tie_gap"] >= 0 for r in rows)
