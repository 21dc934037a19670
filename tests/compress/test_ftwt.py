"""FTWT's pieces against the paper note's checks and hand values: the mass targets, the BCE, the
gated MLP with a perfect predictor, the dense limit bit for bit, and the multiply-add count."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rlx.compress.ftwt import (
    FTWTGate,
    gated_mlp,
    gathered_mlp,
    linear_macs,
    mask_bce,
    mass_targets,
    mean_mass,
    mlp_hidden,
    static_masks,
)
from rlx.errors import RlxError
from rlx.models import tiny

SIZES = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 24}


def model():
    return tiny(**SIZES, device="cpu").model.eval()


def test_the_notes_target_masses():
    # masses [5, 3, 1, 1], total 10, tau 0.8: cumulative 5, 8 -> k = 2
    assert mass_targets(torch.tensor([5.0, 3, 1, 1]), 0.8).tolist() == [1, 1, 0, 0]
    assert mass_targets(torch.tensor([1.0, 1, 3, 5]), 0.8).tolist() == [0, 0, 1, 1]  # order does not matter


def test_tau_one_keeps_every_nonzero_channel_and_tau_zero_exactly_one():
    assert mass_targets(torch.tensor([5.0, 3, 1, 1]), 1.0).tolist() == [1, 1, 1, 1]
    assert mass_targets(torch.tensor([0.0, 5, 0, 3, 1e-6]), 1.0).tolist() == [0, 1, 0, 1, 1]
    for tau in (0.0, 1e-12):
        assert mass_targets(torch.tensor([1.0, 5, 3, 1]), tau).tolist() == [0, 1, 0, 0]


def test_reach_is_a_ceiling_and_the_official_rule_a_floor():
    m = torch.tensor([5.0, 3, 1, 1])  # tau 0.75: 5 falls short, 5 + 3 passes it
    assert mass_targets(m, 0.75).tolist() == [1, 1, 0, 0]
    assert mass_targets(m, 0.75, rule="within").tolist() == [1, 0, 0, 0]
    assert mass_targets(m, 0.8, rule="within").tolist() == [1, 1, 0, 0]  # 0.8 within 0.8 + 1e-5
    assert mass_targets(torch.tensor([5.0, 3, 0, 0]), 1.0, rule="within").tolist() == [1, 1, 0, 0]


def test_bce_by_hand():
    # one token, logits [0, 2], targets [1, 0]: ln 2 + ln(1 + e^2) = 0.6931 + 2.1269 = 2.8201 (summed over channels)
    one = math.log(2) + math.log(1 + math.e**2)
    assert mask_bce([torch.tensor([[0.0, 2.0]])], [torch.tensor([[1.0, 0.0]])]).item() == pytest.approx(one, abs=1e-5)
    # a second token [0, 0] vs [0, 1] costs 2 ln 2; averaged over tokens; a second layer costing 0 halves it
    two = torch.tensor([[0.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zero = torch.tensor([[-1e4]]), torch.tensor([[0.0]])
    got = mask_bce([two[0], zero[0]], [two[1], zero[1]]).item()
    assert got == pytest.approx((one + 2 * math.log(2)) / 2 / 2, abs=1e-5)


def test_a_perfect_predictor_keeps_the_dense_terms_and_drops_the_rest_exactly():
    mlp = model().model.layers[0].mlp
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = mlp_hidden(mlp, x)
        target = mass_targets(h.abs(), 0.8)
        logits = torch.where(target.bool(), torch.inf, -torch.inf)
        mask = torch.sigmoid(logits) > 0.5
        assert torch.equal(mask, target.bool())
        out = gated_mlp(mlp, h, mask)
        by_hand = torch.stack([(mlp.down_proj.weight * (h[t] * target[t])).sum(1) for t in range(5)])
        torch.testing.assert_close(out, by_hand, atol=1e-6, rtol=1e-5)  # dense output on the kept channels
        torch.testing.assert_close(out, gathered_mlp(mlp, x, mask), atol=1e-6, rtol=1e-5)
        noise = torch.where(mask, h, torch.full_like(h, 1e3))  # whatever a dropped channel holds adds nothing
        assert torch.equal(gated_mlp(mlp, noise, mask), out)


def gate_for(m, rank=4):
    gate = FTWTGate(16, 24, 2, rank=rank)
    gate.attach(m)
    return gate


def test_every_channel_kept_is_the_dense_model_bit_for_bit():
    m, ids = model(), torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = m(input_ids=ids).logits
        gate = gate_for(m)
        for head in gate.heads:
            head.net[1].bias.fill_(1e4)  # every logit far above 0: every channel kept
        assert torch.equal(m(input_ids=ids).logits, dense)
        assert gate.flops()["ftwt/kept_share"] == 1.0
        gate.mode = "dense"
        assert torch.equal(m(input_ids=ids).logits, dense)
        gate.mode = "gated"
        for head in gate.heads:
            head.net[1].bias.fill_(0.0)  # random heads: some channels dropped, the output changes
        assert not torch.allclose(m(input_ids=ids).logits, dense)
        gate.detach_from_model()
        assert torch.equal(m(input_ids=ids).logits, dense)


def test_flops_count_by_hand():
    # H 4, I 6, rank 2, one layer; two tokens computing 2 and 6 channels:
    # spent = 3*4*(2 + 6) + 2 tokens * 2*(4 + 6) = 96 + 40 = 136; dense = 2 * 3*4*6 = 144
    gate = FTWTGate(4, 6, 1, rank=2)
    gate.stats.add(0, 1, 2)
    gate.stats.add(0, 1, 6)
    f = gate.flops()
    assert f["ftwt/mlp_flops_skipped"] == pytest.approx(8 / 144)
    assert f["ftwt/kept_share"] == pytest.approx(8 / 12)
    full = FTWTGate(4, 6, 1, rank=None)  # the paper's full head: H*I = 24 per token
    full.stats = gate.stats
    assert full.flops()["ftwt/mlp_flops_skipped"] == pytest.approx(1 - (96 + 48) / 144)


def test_the_counted_flops_are_what_the_gathered_path_multiplies():
    mlp = model().model.layers[0].mlp
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.rand(6, 24, generator=torch.Generator().manual_seed(3)) > 0.6
    mask[:, 0] = True
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gathered_mlp(mlp, x, mask)
    assert counter.get_total_flops() == 2 * 3 * 16 * int(mask.sum())  # torch counts a multiply-add as 2


def test_model_share_counts_every_linear_layer():
    m = model()
    # per layer q, k, v, o 16x16 each, gate/up/down 16x24 each; the LM head vocab x 16
    vocab = m.config.vocab_size
    assert linear_macs(m) == 2 * (4 * 256 + 3 * 384) + vocab * 16
    gate = gate_for(m)
    gate.stats.add(0, 10, 100)
    gate.stats.add(1, 10, 140)
    spent = 3 * 16 * 240 + 2 * 10 * 4 * (16 + 24)  # rank-4 heads
    saved = 3 * 16 * 24 * 20 - spent
    assert gate.flops(m)["ftwt/model_flops_skipped"] == pytest.approx(saved / (10 * linear_macs(m)))


def test_static_masks_keep_the_top_mean_channels_and_compute_only_them():
    m, ids = model(), torch.randint(3, 90, (3, 9), generator=torch.Generator().manual_seed(4))
    gate = gate_for(m)
    mass = mean_mass(m, gate, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    gate.static_masks = static_masks(mass, [5, 24])
    assert gate.static_masks[0].sum() == 5 and set(gate.static_masks[0].nonzero().flatten().tolist()) == set(
        mass[0].argsort(descending=True)[:5].tolist())
    mlp, x = m.model.layers[0].mlp, torch.randn(4, 16)
    gate.mode = "static"
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), gathered_mlp(mlp, x, gate.static_masks[0].expand(4, -1)))


def test_bad_settings_are_one_line_errors():
    with pytest.raises(RlxError, match="tau"):
        FTWTGate(16, 24, 2, tau=1.5)
    with pytest.raises(RlxError, match="rank"):
        FTWTGate(16, 24, 2, rank=64)
    with pytest.raises(RlxError, match="algo.hidden_size"):
        FTWTGate(32, 24, 2, rank=4).attach(model())
    with pytest.raises(RlxError, match="algo.num_layers"):
        FTWTGate(16, 24, 3, rank=4).attach(model())
