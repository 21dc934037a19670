"""The shared RL math in rlx.algorithms._rl against hand-computed values and direct references."""
import math

import pytest
import torch

from rlx.algorithms._rl import (
    aggregate,
    aggregation_weight,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    whiten,
)


def close(actual: torch.Tensor, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---- GAE -----------------------------------------------------------------------------------


def gae_by_definition(rewards, values, mask, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over each row's valid tokens, V after the last = 0."""
    adv, ret = torch.zeros_like(values), torch.zeros_like(values)
    for b in range(values.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()  # masked tokens are not steps of the episode
        r, v = rewards[b, idx].tolist(), values[b, idx].tolist() + [0.0]
        delta = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(idx))]
        for k, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** j * delta[k + j] for j in range(len(idx) - k))
            ret[b, t] = adv[b, t] + v[k]
    return adv, ret


def random_episodes(seed, interior_holes=False):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 7
    lengths = torch.tensor([7, 1, 4, 0, 6])  # ragged, incl. a full row and an empty one
    mask = (torch.arange(T) < lengths[:, None]).float()
    if interior_holes:  # e.g. tool-output tokens inside a turn
        mask[0, 2] = mask[0, 3] = mask[4, 1] = 0
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0), (0.5, 1.0)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_its_definition_on_ragged_batches(gamma, lam, holes):
    rewards, values, mask = random_episodes(seed=int(gamma * 100 + lam * 10), interior_holes=holes)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_by_definition(rewards, values, mask, gamma, lam)
    close(adv, ref_adv, atol=1e-10)
    close(ret, ref_ret, atol=1e-10)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_with_gamma_lam_one_is_return_to_go_minus_value():
    rewards, values, mask = random_episodes(seed=3)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    # padding rewards are 0, so a reversed cumsum over the full width is the return-to-go
    return_to_go = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    close(adv, return_to_go - values, atol=1e-10)
    close(ret, return_to_go, atol=1e-10)


def test_gae_by_hand():
    # r = [0, 1, pad], V = [0.5, 0.8, pad], gamma 0.9, lam 0.5
    # delta_1 = 1 + 0.9*0 - 0.8 = 0.2 (terminal);  delta_0 = 0 + 0.9*0.8 - 0.5 = 0.22
    # A_1 = 0.2;  A_0 = 0.22 + 0.45*0.2 = 0.31;  R = A + V = [0.81, 1.0]
    adv, ret = gae(torch.tensor([[0.0, 1.0, 7.0]]), torch.tensor([[0.5, 0.8, 9.0]]),
                   torch.tensor([[1, 1, 0]]), gamma=0.9, lam=0.5)
    close(adv, [[0.31, 0.2, 0.0]])
    close(ret, [[0.81, 1.0, 0.0]])


# ---- GRPO advantages ------------------------------------------------------------------------


REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_group_advantages_group_std_is_unbiased():
    # group 1: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735
    #   A = +-0.5 / 0.57735 = +-0.866025 (eps=0);  with eps=1e-4: 0.5 / 0.57745 = 0.865876
    # group 2: all equal -> deviations 0 -> A = 0 / (0 + eps) = 0
    s = 0.5 * math.sqrt(3)
    close(group_advantages(REWARDS, 4, "group", eps=0.0)[:4], [s, -s, -s, s])
    close(group_advantages(REWARDS, 4, "group"), [0.865876, -0.865876, -0.865876, 0.865876, 0, 0, 0, 0])


def test_group_advantages_batch_and_none():
    # batch std of the raw rewards: mean 0.75; 6 x (0.25)^2 + 2 x (0.75)^2 = 1.5; var = 1.5/7
    # std = 0.462910; A = group-centred / std = +-0.5 / 0.462910 = +-1.080123; group 2 still 0
    b = 0.5 / math.sqrt(1.5 / 7)
    close(group_advantages(REWARDS, 4, "batch", eps=0.0), [b, -b, -b, b, 0, 0, 0, 0])
    # Dr.GRPO: centred, not scaled
    close(group_advantages(REWARDS, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_group_advantages_rejects_bad_layouts():
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 4, "rank")


# ---- clipped policy loss --------------------------------------------------------------------


def test_clipped_policy_loss_by_hand_with_clip_higher():
    # eps_low 0.2 -> lower edge 0.8; eps_high 0.28 -> upper edge 1.28. loss = -min(rA, clip(r)A)
    #  r    A   rA    clip(r)A   loss   clipped branch
    # 1.1  +1   1.1    1.1      -1.1    no (inside)
    # 1.5  +1   1.5    1.28     -1.28   high
    # 0.5  +1   0.5    0.8      -0.5    no (pessimistic min keeps rA)
    # 0.5  -1  -0.5   -0.8       0.8    low
    # 1.5  -1  -1.5   -1.28      1.5    no
    # 1.25 +1   1.25   1.25     -1.25   no (would be clipped at a symmetric 0.2)
    # 3.0  +1   (padding: loss 0, not counted as clipped)
    r = torch.tensor([[1.1, 1.5, 0.5, 0.5, 1.5, 1.25, 3.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    loss, clipped = clipped_policy_loss(r.log(), torch.zeros_like(r), adv, mask, 0.2, 0.28)
    close(loss, [[-1.1, -1.28, -0.5, 0.8, 1.5, -1.25, 0.0]])
    assert clipped.tolist() == [[False, True, False, True, False, False, False]]
    assert (clipped & (adv < 0)).nonzero().tolist() == [[0, 3]]  # low side
    assert (clipped & (adv > 0)).nonzero().tolist() == [[0, 1]]  # high side
    # symmetric 0.2: 1.25 now clips to 1.2
    loss, clipped = clipped_policy_loss(r.log(), torch.zeros_like(r), adv, mask)
    assert loss[0, 5].item() == pytest.approx(-1.2) and clipped[0, 5]


def test_sequence_advantages_broadcast_over_tokens():
    # A = [2, -1] per sequence, r = 1 everywhere: loss = -A per valid token
    logp = torch.zeros(2, 3)
    loss, _ = clipped_policy_loss(logp, logp, torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    close(loss, [[-2.0, -2.0, 0.0], [1.0, 1.0, 1.0]])


def test_no_clip_limit_is_vanilla_policy_gradient():
    # eps -> inf: loss = -r A; at r = 1 (old = current, detached) d loss / d theta = -A d logp / d theta
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 4))
    adv, mask = torch.tensor([0.7, -1.3]), torch.ones(2, 4)

    def logp():
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)

    loss, clipped = clipped_policy_loss(logp(), logp().detach(), adv, mask, 1e9, 1e9)
    (g_clip,) = torch.autograd.grad(loss.sum(), logits)
    (g_pg,) = torch.autograd.grad((-adv[:, None] * logp()).sum(), logits)
    close(g_clip, g_pg, atol=1e-6)
    assert not clipped.any()
    # away from r = 1 it is -r A exactly: r = 2, A = 0.7 -> -1.4
    far, _ = clipped_policy_loss(torch.tensor([[math.log(2)]]), torch.zeros(1, 1), torch.tensor([0.7]),
                                    torch.ones(1, 1), 1e9, 1e9)
    close(far, [[-1.4]])


# ---- aggregation ----------------------------------------------------------------------------


# lengths 1 and 3; the padded entries (99) must not count
PER_TOKEN = torch.tensor([[2.0, 99.0, 99.0], [1.0, 3.0, 5.0]])
MASK = torch.tensor([[1, 0, 0], [1, 1, 1]])


def test_aggregation_modes_by_hand():
    # token_mean:              (2 + 1 + 3 + 5) / 4 tokens         = 2.75
    # seq_mean_token_mean:     (2/1 + 9/3) / 2 sequences          = 2.5
    # seq_mean_token_sum_norm: 11 / (2 sequences * 3 padded width) = 1.8333; with max_len 4: 11 / 8 = 1.375
    assert aggregate(PER_TOKEN, MASK, "token_mean").item() == pytest.approx(2.75)
    assert aggregate(PER_TOKEN, MASK, "seq_mean_token_mean").item() == pytest.approx(2.5)
    assert aggregate(PER_TOKEN, MASK, "seq_mean_token_sum_norm").item() == pytest.approx(11 / 6)
    assert aggregate(PER_TOKEN, MASK, "seq_mean_token_sum_norm", max_len=4).item() == pytest.approx(1.375)
    # the units each mode averages over: 4 tokens, 2 sequences, 2 x 3 (or 2 x 4) token slots
    assert [aggregation_weight(MASK, m) for m in ("token_mean", "seq_mean_token_mean",
                                                  "seq_mean_token_sum_norm")] == [4, 2, 6]
    assert aggregation_weight(MASK, "seq_mean_token_sum_norm", max_len=4) == 8
    with pytest.raises(ValueError):
        aggregate(PER_TOKEN, MASK, "token-mean")


@pytest.mark.parametrize("mode,expected", [("token_mean", 2.75), ("seq_mean_token_mean", 2.5),
                                           ("seq_mean_token_sum_norm", 1.375)])
def test_weighting_micro_batches_by_aggregation_weight_is_exact(mode, expected):
    # The loop's rule: sum_k loss_k * n_k / sum_k n_k, one row per micro-batch, each padded to its own
    # width (row 0 has width 1), max_len fixed at 4.
    #   token_mean: 2 * 1/4 + 3 * 3/4 = 2.75;  seq_mean_token_mean: 2 * 1/2 + 3 * 1/2 = 2.5
    #   seq_mean_token_sum_norm: slots 1*4 and 1*4: (2/4) * 4/8 + (9/4) * 4/8 = 1.375
    micro = [(PER_TOKEN[:1, :1], MASK[:1, :1]), (PER_TOKEN[1:], MASK[1:])]
    n = [aggregation_weight(m, mode, max_len=4) for _, m in micro]
    total = sum(aggregate(x, m, mode, max_len=4) * n_k for (x, m), n_k in zip(micro, n)) / sum(n)
    assert total.item() == pytest.approx(expected)


def test_masked_mean_rows_and_empty_rows():
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    close(masked_mean(x, torch.tensor([[1, 1], [0, 0]]), dim=-1), [2.0, 0.0])  # empty row -> 0, not NaN
    close(masked_mean(x, torch.tensor([[1, 0], [0, 1]])), 4.0)  # (1 + 7) / 2


# ---- KL, whitening, value loss, entropy -----------------------------------------------------


def test_kl_estimators_by_hand():
    # logp = ln 0.5, ref = ln 0.25: logp - ref = ln 2 = 0.693147
    #   k1 = 0.693147;  k2 = 0.5 * 0.693147^2 = 0.240227;  k3 = e^{-ln 2} + ln 2 - 1 = 0.193147
    # swapped, logp - ref = -ln 2: k1 = -0.693147 (< 0);  k3 = e^{ln 2} - ln 2 - 1 = 0.306853 (>= 0)
    lp, ref = torch.tensor([math.log(0.5), math.log(0.25)]), torch.tensor([math.log(0.25), math.log(0.5)])
    close(kl_penalty(lp, ref, "k1"), [0.693147, -0.693147])
    close(kl_penalty(lp, ref, "k2"), [0.240227, 0.240227])
    close(kl_penalty(lp, ref, "k3"), [0.193147, 0.306853])
    close(kl_penalty(lp, ref, "low_var_kl"), kl_penalty(lp, ref, "k3"))  # verl's names are aliases
    close(kl_penalty(lp, ref, "mse"), kl_penalty(lp, ref, "k2"))
    for est in ("k1", "k2", "k3"):
        close(kl_penalty(lp, lp, est), [0.0, 0.0])
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k4")


def test_whiten_by_hand():
    # valid x = [1, 2, 3]: mean 2, unbiased var (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1]; padding -> 0
    x, mask = torch.tensor([[1.0, 2.0], [3.0, 100.0]]), torch.tensor([[1, 1], [1, 0]])
    close(whiten(x, mask), [[-1.0, 0.0], [1.0, 0.0]])
    close(whiten(x, mask, shift_mean=False), [[1.0, 2.0], [3.0, 0.0]])  # scaled by 1/std = 1, mean kept


def test_clipped_value_loss_by_hand():
    # old value 1.0, clip 0.2 -> v is clipped into [0.8, 1.2]
    # v=1.5, R=2: (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.5 * 0.64 = 0.32, clipped branch wins
    # v=1.5, R=1: (1.5-1)^2 = 0.25, (1.2-1)^2 = 0.04 -> 0.5 * 0.25 = 0.125
    # v=1.1, R=0: inside the window, 1.21 both -> 0.605;  last token is padding -> 0
    loss, clipped = clipped_value_loss(torch.tensor([[1.5, 1.5, 1.1, 9.0]]), torch.ones(1, 4),
                                       torch.tensor([[2.0, 1.0, 0.0, 0.0]]), torch.tensor([[1, 1, 1, 0]]), 0.2)
    close(loss, [[0.32, 0.125, 0.605, 0.0]])
    assert clipped.tolist() == [[True, False, False, False]]


def test_entropy_by_hand_and_stable():
    close(entropy_from_logits(torch.zeros(3, 7)), [math.log(7)] * 3)  # uniform over V=7 -> ln 7
    # p = [1/4, 3/4]: H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335
    close(entropy_from_logits(torch.tensor([0.0, math.log(3)])), 0.562335)
    close(entropy_from_logits(torch.tensor([0.0, 0.0, -math.inf])), math.log(2))  # banned token: no NaN
    close(entropy_from_logits(torch.tensor([1e4, 1e4])), math.log(2))  # large float32 logits
