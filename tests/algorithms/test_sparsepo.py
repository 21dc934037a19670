"""SparsePO against the paper note's hand-computed toy pair, its limits (DPO with the KL term off,
TDPO-1 with all-ones masks, log 2 with all-zero masks), the MaPO map's properties, the learned
mask's gradients, and runs of the loop (each mask; exact resume of the learned heads)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from rlx.algorithms._pairs import response_logps
from rlx.algorithms.dpo import dpo_loss
from rlx.algorithms.sparsepo import (
    SparsePO,
    activation_map,
    l1_norms,
    masked_sums,
    sparsepo_loss,
    token_terms,
    zn_rescale,
)
from rlx.data.collate import IGNORE
from rlx.data.preferences import ReasoningPairs
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import losses as logged_losses
from tests.support import small_config, straight_and_resumed

SMALL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningPairs(num_train=16, num_validation=2, num_test=2)
DATA = ["data=reasoning_pairs", "data.num_train=32", "data.num_validation=4", "data.num_test=4",
        "trainer.micro_batch_size=2"]


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------- the note's toy pair

# One pair, beta 0.1, three valid tokens each: chosen r = [0.5, 0.5, 0], rejected r = [-0.2, -0.3, -0.5]
# (as policy log-probs with a zero reference), token KLs chosen [0.1, 0.2, 0], rejected [0.05, 0, 0.3].
R_W, R_L = t([0.5, 0.5, 0.0]), t([-0.2, -0.3, -0.5])
K_W, K_L = t([0.1, 0.2, 0.0]), t([0.05, 0.0, 0.3])
ALL = torch.ones(1, 3, dtype=torch.bool)


def toy(m_w, m_l, kl_w=None, kl_l=None):
    zero = torch.zeros(1, 3)
    u_w, s_w = masked_sums(R_W, zero, K_W, m_w, m_w if kl_w is None else kl_w, ALL)
    u_l, s_l = masked_sums(R_L, zero, K_L, m_l, m_l if kl_l is None else kl_l, ALL)
    return u_w, u_l, s_w, s_l


def test_dpo_limit_of_the_toy_pair():
    # m_u = 1, m_d = 0: h = 1.0 - (-1.0) = 2, loss softplus(-0.2) = 0.598139
    ones, zeros = torch.ones(1, 3), torch.zeros(1, 3)
    loss = sparsepo_loss(*toy(ones, ones, zeros, zeros), beta=0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)


def test_masked_toy_pair_by_hand():
    # masks [1,0,1] / [0,1,1]: U_w - U_l = 0.5 - (-0.8) = 1.3; S_w = 0.1, S_l = 0.3; logit 1.1; softplus(-0.11)
    u_w, u_l, s_w, s_l = toy(t([1.0, 0.0, 1.0]), t([0.0, 1.0, 1.0]))
    assert (u_w - u_l).item() == pytest.approx(1.3) and s_w.item() == pytest.approx(0.1)
    assert s_l.item() == pytest.approx(0.3)
    assert sparsepo_loss(u_w, u_l, s_w, s_l, beta=0.1).item() == pytest.approx(0.639659, abs=1e-6)


def test_sign_convention_more_chosen_kl_raises_the_logit():
    # the note's U_w - U_l + S_w - S_l: a larger chosen KL lowers the loss, a larger rejected KL raises it
    ones = torch.ones(1, 3)
    base = sparsepo_loss(*toy(ones, ones), beta=0.1).item()
    u_w, u_l, s_w, s_l = toy(ones, ones)
    assert sparsepo_loss(u_w, u_l, s_w + 1, s_l, beta=0.1).item() < base
    assert sparsepo_loss(u_w, u_l, s_w, s_l + 1, beta=0.1).item() > base


def test_l1_term_of_the_toy_masks():
    # 0.001 x (||[1,0,1]||_1 + ||[0,1,1]||_1) = 0.001 x 4 = 0.004
    norms = l1_norms(t([1.0, 0.0, 1.0]), ALL) + l1_norms(t([0.0, 1.0, 1.0]), ALL)
    assert (0.001 * norms).item() == pytest.approx(0.004)


def test_all_zero_masks_give_log_2_and_no_policy_gradient():
    policy, reference = tiny(**SMALL, seed=1, device="cpu"), tiny(**SMALL, device="cpu")
    batch = SparsePO(reference).pairs.tokenize(TASK.split("train")[:2], policy.tokenizer, "cpu")
    logits = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        ref_logits = reference.model(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logps, ref_logps, kl = token_terms(logits, ref_logits, labels)
    zeros = torch.zeros_like(logps)
    u, s = masked_sums(logps, ref_logps, kl, zeros, zeros, labels != IGNORE)
    (u_w, u_l), (s_w, s_l) = u.chunk(2), s.chunk(2)
    losses = sparsepo_loss(u_w, u_l, s_w, s_l, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    losses.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in policy.model.parameters())


# ---------------------------------------------------------------------------- the activation map


def test_zn_rescale_per_hook_is_0_to_1_on_valid_tokens_and_affine_invariant():
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, 5:] = False  # a shorter row
    valid[2, :2] = False  # a prompt part
    out = zn_rescale(x, valid)
    for row, v in zip(out, valid):
        assert row[v].min().item() == 0.0 and row[v].max().item() == 1.0
        assert not row[~v].any()
    # a constant shift and a positive scale of the hook's activations leave the map unchanged
    assert torch.allclose(zn_rescale(3.5 * x - 2.0, valid), out, atol=1e-6)
    # a hand case: [1, 2, 4] -> (x - 1) / 3 = [0, 1/3, 1] (the z-normalisation cancels)
    assert zn_rescale(t([1.0, 2.0, 4.0]), ALL).tolist()[0] == pytest.approx([0.0, 1 / 3, 1.0])


def test_activation_mask_of_the_reference_is_in_0_1_and_detached():
    policy, reference = tiny(**SMALL, seed=1, device="cpu"), tiny(**SMALL, device="cpu")
    algo = SparsePO(reference, mask="activation")
    batch = algo.pairs.tokenize(TASK.split("train")[:3], policy.tokenizer, "cpu")
    logits, hidden, hooked = algo.reference_forward(batch)
    assert len(hooked["mlp"]) == len(hooked["attention"]) == len(hidden) == 2  # one per layer, embeddings out
    valid = batch["labels"][:, 1:] != IGNORE
    m_u, m_d = algo.masks(hidden, hooked, logits, valid)
    assert m_u is m_d and not m_u.requires_grad
    assert m_u.shape == valid.shape and m_u.min() >= 0 and m_u.max() <= 1
    assert not m_u[~valid].any()
    # each hook's own map reaches 0 and 1; the average of eight of them is a weighting in between
    single = activation_map({"mlp": hooked["mlp"][:1]}, valid)
    assert single[valid].min().item() == 0.0 and single[valid].max().item() == 1.0


def test_activation_mask_needs_a_llama_layout():
    reference = tiny(**SMALL, device="cpu")
    reference.model.model.layers = None
    with pytest.raises(RlxError, match="Llama layout"):
        SparsePO(reference, mask="activation")


# ---------------------------------------------------------------------------- on the tiny model


def setup(seed=1, **kwargs):
    policy, reference = tiny(**SMALL, seed=seed, device="cpu"), tiny(**SMALL, device="cpu")
    algo = SparsePO(reference, **kwargs)
    params = [p for p in policy.model.parameters()] + [p for g in algo.param_groups() for _, p in g["params"]]
    state = TrainState(policy.model, policy.tokenizer, torch.optim.SGD(params, lr=0.1), None, TASK)
    return algo, state, reference


def test_ones_without_kl_is_dpo_bit_for_bit():
    algo, state, reference = setup(mask="ones", mask_on_kl=False)
    batch = algo.make_batch(TASK.split("train")[:4], state)
    loss, metrics = algo.loss(batch, state)
    chosen, rejected = response_logps(state.model, batch)[0].chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = response_logps(reference.model, batch)[0].chunk(2)
    losses, chosen_rewards, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    assert torch.equal(loss, losses.mean())
    assert metrics["sparsepo/chosen_reward"] == chosen_rewards.mean().item()


def test_ones_on_both_is_tdpo_1():
    # TDPO-1: DPO's margin plus beta (SeqKL_w - SeqKL_l), the token KL here from torch's kl_div
    algo, state, reference = setup(mask="ones")
    batch = algo.make_batch(TASK.split("train")[:4], state)
    loss, _ = algo.loss(batch, state)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
    logits = state.model(input_ids=ids, attention_mask=am).logits[:, :-1]
    with torch.no_grad():
        ref = reference.model(input_ids=ids, attention_mask=am).logits[:, :-1]
    kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    seq_kl_w, seq_kl_l = (kl * (labels != IGNORE)).sum(-1).chunk(2)
    chosen, rejected = response_logps(state.model, batch)[0].chunk(2)
    ref_chosen, ref_rejected = response_logps(reference.model, batch)[0].chunk(2)
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    expected = -F.logsigmoid(0.1 * (h + seq_kl_w - seq_kl_l)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert seq_kl_w.min() > 0  # the policy differs from the reference, so the KL term matters


def test_learned_mask_is_nonnegative_and_trains_the_heads_not_the_reference():
    algo, state, reference = setup(mask="learned", independent=True)
    assert set(algo.heads) == {"reward", "kl"}
    batch = algo.make_batch(TASK.split("train")[:4], state)
    _, hidden, hooked = algo.reference_forward(batch)
    valid = batch["labels"][:, 1:] != IGNORE
    m_u, m_d = algo.masks(hidden, hooked, None, valid)
    assert m_u.min() >= 0 and m_d.min() >= 0 and (m_u > 0).any() and (m_u == 0).any()  # ReLU: sparse
    loss, metrics = algo.loss(batch, state)
    loss.backward()
    for head in algo.heads.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(not p.requires_grad and p.grad is None for p in reference.model.parameters())
    assert 0 < metrics["sparsepo/reward_mask_sparsity_chosen"] < 1


def test_learned_heads_are_seeded_and_in_one_optimizer_group():
    first, second = setup(mask="learned")[0], setup(mask="learned")[0]
    assert all(torch.equal(a, b) for a, b in zip(first.heads.parameters(), second.heads.parameters()))
    other = setup(mask="learned", mask_seed=1)[0]
    assert not all(torch.equal(a, b) for a, b in zip(first.heads.parameters(), other.heads.parameters()))
    (group,) = first.param_groups()
    assert group["weight_decay"] == 0.01 and all(n.startswith("sparsepo_mask.common.") for n, _ in group["params"])
    assert setup(mask="ones")[0].param_groups() == []


class OnesHead(torch.nn.Module):
    def forward(self, hidden):
        return torch.ones(hidden[0].shape[:2])


def test_common_mask_l1_is_counted_once():
    # lambda_u = lambda_d = 0.001 on a common all-ones mask: 0.001 x (valid chosen + rejected tokens) per pair
    plain, state, _ = setup(mask="learned")
    with_l1 = setup(mask="learned", l1_reward=0.001, l1_kl=0.001)[0]
    plain.heads["common"] = with_l1.heads["common"] = OnesHead()
    batch = plain.make_batch(TASK.split("train")[:2], state)
    tokens = (batch["labels"][:, 1:] != IGNORE).sum().item()
    difference = with_l1.loss(batch, state)[0].item() - plain.loss(batch, state)[0].item()
    assert difference == pytest.approx(0.001 * tokens / 2, abs=1e-6)


def test_bad_settings_are_clear_errors():
    with pytest.raises(RlxError, match=r"algo.reference='\$\{model\}'"):
        SparsePO(None)
    reference = tiny(**SMALL, device="cpu")
    with pytest.raises(RlxError, match="algo.mask"):
        SparsePO(reference, mask="random")
    with pytest.raises(RlxError, match="mask=learned only"):
        SparsePO(reference, mask="activation", l1_reward=0.001)
    with pytest.raises(RlxError, match="mask=learned only"):
        SparsePO(reference, mask="ones", independent=True)
    with pytest.raises(RlxError, match="beta"):
        SparsePO(reference, beta=0.0)
    with pytest.raises(RlxError, match="masks nothing"):
        SparsePO(reference, mask_on_reward=False, mask_on_kl=False)


# ---------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("mask", ["learned", "activation", pytest.param("ones", marks=pytest.mark.slow)])
def test_sparsepo_runs_in_the_loop(tmp_path, mask):
    run_training(small_config("algo=sparsepo", f"algo.mask={mask}", "model.num_layers=2", *DATA), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "sparsepo/reward_margin", "sparsepo/seq_kl_chosen", "sparsepo/seq_kl_rejected",
            "sparsepo/reward_mask_sparsity_chosen", "sparsepo/kl_mask_sparsity_rejected"} <= set(rows[0])
    assert rows[0]["sparsepo/seq_kl_chosen"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.slow
def test_learned_mask_resumes_exactly(tmp_path):
    # two layers: with one, the mixer is a single weight, and at mask_seed 0 it is negative (a dead mask)
    # a constant LR: the cut run stops by max_steps, so a cosine schedule would be another one there
    overrides = ["algo=sparsepo", "algo.mask=learned", "optimizer.lr=1e-2", "model.num_layers=2",
                 "trainer.lr_scheduler=constant", *DATA]
    full, resumed, full_weights, resumed_weights = straight_and_resumed(tmp_path, overrides)
    assert all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)
    straight, cut = logged_losses(tmp_path / "full"), logged_losses(tmp_path / "cut")
    assert cut[-1] == straight[-1] and straight[-1] != pytest.approx(math.log(2), abs=1e-4)
