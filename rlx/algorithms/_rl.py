"""Shared RL math as pure tensor functions: advantages, policy and value losses, KL, aggregation.

No model and no config here; the algorithm modules (GRPO, PPO, ...) compose these. Shapes: `[B]`
is one value per sequence, `[B, T]` one per completion token, right-padded, with a 0/1 `mask`.

Names in TRL / verl / OpenRLHF:

    group_advantages     TRL GRPO scale_rewards; verl adv_estimator=grpo (+ norm_adv_by_std_in_grpo);
                         OpenRLHF --algo.advantage.estimator group_norm / dr_grpo
    clipped_policy_loss  TRL epsilon / epsilon_high; verl clip_ratio_low / clip_ratio_high;
                         OpenRLHF --actor.eps_clip_low_high (DAPO clip-higher when high > low)
    aggregate            TRL loss_type; verl actor.loss_agg_mode (our names are verl's with "_");
                         OpenRLHF token_level_loss
    kl_penalty           verl kl_penalty / kl_loss_type (kl|k1, mse|k2, low_var_kl|k3); TRL/OpenRLHF k1..k3
    gae                  TRL PPO gamma/lam; verl adv_estimator=gae; OpenRLHF --algo.advantage.gamma/lambd
    whiten               TRL/verl masked_whiten (PPO advantage normalisation)
    clipped_value_loss   TRL cliprange_value; verl critic cliprange_value; OpenRLHF --critic.value_clip
"""
from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}
_MAX_LOG_RATIO = 20.0  # verl clamps log-ratios to +-20 before exp so one stale token cannot overflow


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over `dim` (all elements if None); 0, not NaN, where the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     lengths: Tensor | None = None) -> Tensor:
    """GRPO advantages A_i = (r_i - mean_group(r)) / (std + eps), rows laid out group after group.

    scale="group":  std of the sample's own group (GRPO; TRL scale_rewards="group",
                    verl norm_adv_by_std_in_grpo=True, OpenRLHF group_norm).
    scale="batch":  std of all rewards passed in (TRL scale_rewards="batch"; like TRL, the std of
                    the raw rewards, not of the centred advantages).
    scale="batch_tokens": the group-centred values whitened over every response token of the
                    batch: a token-weighted mean and Bessel-corrected std, so longer responses
                    weigh more (`lengths` required). verl adv_estimator=reinforce_plus_plus_baseline
                    (group mean, then masked_whiten); DLER's batch normalisation (its eq. 3).
    scale="none":   mean-centred only (Dr.GRPO; TRL "none", verl norm_adv_by_std_in_grpo=False,
                    OpenRLHF dr_grpo).

    The std is torch.std's default, the unbiased (n-1) estimator, as TRL, verl and OpenRLHF use;
    eps=1e-4 is TRL's (verl uses 1e-6). A group whose rewards are all equal gets advantage 0
    (except under batch_tokens, whose batch re-centring shifts it, as in verl).
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"need groups of >= 2 samples dividing the batch; got {rewards.numel()} rows, "
                         f"group_size={group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
    elif scale == "batch":
        std = grouped.std()
    elif scale == "batch_tokens":
        if lengths is None:
            raise ValueError("scale='batch_tokens' needs the responses' token lengths")
        return token_whiten(centred, lengths)
    else:
        raise ValueError(f"scale must be 'group', 'batch', 'batch_tokens' or 'none', not {scale!r}")
    return centred / (std + eps)


def token_whiten(values: Tensor, lengths: Tensor) -> Tensor:
    """Per-sequence `values` [B] whitened as if broadcast over each sequence's `lengths` tokens:
    `whiten` of the [B, T] broadcast, taken back to one value per sequence."""
    w = lengths.to(values.device, torch.float32)
    n = w.sum()
    mean = (w * values).sum() / n.clamp(min=1)
    var = (w * (values - mean).square()).sum() / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO/GRPO clipped surrogate per token: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),
    r = exp(logprobs - old_logprobs).

    eps_low/eps_high are TRL epsilon/epsilon_high, verl clip_ratio_low/high, OpenRLHF
    eps_clip_low_high; eps_high > eps_low is DAPO's clip-higher. `advantages` is per sequence [B]
    (GRPO) or per token [B, T] (PPO/GAE). Returns (per_token_loss [B, T], zero on padding;
    clipped: bool [B, T]), clipped where the clipped branch is active and the token gets no
    gradient: r < 1 - eps_low with A < 0, or r > 1 + eps_high with A > 0. So the sign of A splits
    it into TRL's low/high clip metrics (clipped & (A < 0), clipped & (A > 0)); the clip fraction
    is masked_mean(clipped.float(), mask), as TRL and verl report it.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    valid = mask.bool()
    loss = torch.where(valid, torch.maximum(unclipped, clipped), 0.0)
    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    return loss, valid & (low | high)


def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar; the biggest silent difference between frameworks.

    token_mean               sum_{i,t} m l / sum_{i,t} m        DAPO; verl token-mean (default);
                                                                TRL loss_type dapo (bnpo per batch)
    seq_mean_token_mean      1/B sum_i (sum_t m l / sum_t m)    original GRPO; verl seq-mean-token-mean;
                                                                TRL loss_type grpo
    seq_mean_token_sum_norm  sum_{i,t} m l / (B * max_len)      Dr.GRPO; verl seq-mean-token-sum-norm;
                                                                TRL loss_type dr_grpo

    max_len should be the constant generation budget (TRL max_completion_length); None uses the
    padded width T, which is verl's default and only constant if every batch is padded alike.
    (Older verl divides by T alone, without 1/B: the same up to a constant factor.) A sequence
    with no valid token counts as a zero-loss sequence in both seq_mean modes, as in TRL.
    """
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    if mode == "seq_mean_token_mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    if mode == "seq_mean_token_sum_norm":
        return (per_token * mask.to(per_token.dtype)).sum() / (mask.shape[0] * (max_len or mask.shape[-1]))
    raise ValueError(f"mode must be one of {AGG_MODES}, not {mode!r}")


def aggregation_weight(mask: Tensor, mode: str, max_len: int | None = None) -> int:
    """How many units `aggregate(..., mode, max_len)` averages over: the micro-batch's `num_targets`.

    The loop scales each micro-batch's loss by num_targets / sum(num_targets), so with
    loss = aggregate(per_token, mask, mode, max_len) and num_targets = aggregation_weight(mask, mode,
    max_len), accumulation over micro-batches equals one big batch exactly:
      token_mean:               valid tokens       -> global token mean (TRL dapo; not bnpo, which
                                                      averages per micro-batch)
      seq_mean_token_mean:      sequences B        -> global mean of per-sequence token means
      seq_mean_token_sum_norm:  token slots B*max_len -> global token sum / (total B * max_len),
                                                      provided every micro-batch passes the same max_len
    """
    if mode == "token_mean":
        return int(mask.sum().item())
    if mode == "seq_mean_token_mean":
        return mask.shape[0]
    if mode == "seq_mean_token_sum_norm":
        return mask.shape[0] * (max_len or mask.shape[-1])
    raise ValueError(f"mode must be one of {AGG_MODES}, not {mode!r}")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    k1 (verl "kl"):          logp - ref                         unbiased, can be negative
    k2 (verl "mse"):         0.5 (logp - ref)^2                 >= 0, biased
    k3 (verl "low_var_kl"):  exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased, low variance;
                             TRL GRPO's beta term, OpenRLHF --algo.kl.estimator k3
    k3 clamps the log-ratio to +-20 and the result to <= 10, as verl does, so a token whose
    reference probability is vanishingly small cannot blow up the loss (and its gradient stays
    finite: without the inner clamp exp overflows and the clamped branch's gradient is NaN).

    As a loss term (GRPO/PPO kl_coef) the values are estimates but the gradients are what matter:
    k1's expected gradient is zero (E_pi[grad log pi] = 0), so k1 as a loss does nothing on
    average; k2's expected gradient is that of KL(pi || pi_ref); k3's
    gradient, grad(exp(ref - logp) - (ref - logp)) = (1 - pi_ref/pi) grad log pi, has the expected
    gradient of the reverse KL(pi_ref || pi), not of KL(pi || pi_ref). These are the estimators
    as TRL and verl use them.
    """
    kind = KL_ESTIMATORS.get(estimator)
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        neg = (-log_ratio).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return (neg.exp() - neg - 1).clamp(max=10.0)
    raise ValueError(f"estimator must be one of {sorted(KL_ESTIMATORS)}, not {estimator!r}")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation: A_t = sum_l (gamma lam)^l delta_{t+l},
    delta_t = r_t + gamma V_{t+1} - V_t, returns R_t = A_t + V_t.

    The value after a sequence's last valid token is 0 (terminal). Masked positions are skipped:
    the recursion carries V and A through them unchanged (verl's compute_gae_advantage_return), so
    right padding ends the episode and interior masked tokens (e.g. tool output) are stepped over.
    Outputs are 0 on masked positions. Defaults elsewhere: TRL gamma=1, lam=0.95; verl and
    OpenRLHF gamma=lam=1. Vectorised over the batch, one loop over time.
    """
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        next_adv = torch.where(m[:, t] > 0, adv_t, next_adv)
        next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
        advantages[:, t] = adv_t * m[:, t]
    return advantages, (advantages + values) * m


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked elements, 0 on padding (TRL/verl masked_whiten).

    The variance is Bessel-corrected (n-1), as in TRL and verl. shift_mean=False adds the mean back,
    rescaling without centring (TRL uses it to whiten rewards).
    """
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean).square(), mask) * n / (n - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip: float) -> tuple[Tensor, Tensor]:
    """PPO value loss per token: 0.5 max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2).

    c is TRL cliprange_value (0.2), verl critic cliprange_value (0.5), OpenRLHF --critic.value_clip.
    Returns (per_token_loss [B, T], zero on padding; clipped: bool [B, T], where the clipped
    branch is strictly larger, i.e. verl's vf_clipfrac). Reduce it with `aggregate`.
    """
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped = (values - returns).square()
    clipped = (v_clipped - returns).square()
    valid = mask.bool()
    loss = torch.where(valid, 0.5 * torch.maximum(unclipped, clipped), 0.0)
    return loss, valid & (clipped > unclipped)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy H = -sum_v p_v log p_v over the last dimension.

    From log_softmax, not logsumexp(z) - sum p z: that difference of two large numbers loses
    precision when logits are large. log p is floored at the dtype's minimum so banned tokens
    (logit -inf) contribute 0 * finite = 0 instead of 0 * -inf = NaN.
    """
    logp = torch.log_softmax(logits, dim=-1).clamp(min=torch.finfo(logits.dtype).min)
    return -(logp.exp() * logp).sum(-1)
