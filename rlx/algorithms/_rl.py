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
                     lengths: Tensor | None = None, gather=None) -> Tensor:
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

    `gather` (a 1-d tensor -> the whole batch's, e.g. rlx.distributed.batch_concat) widens the batch
    statistics to rows held elsewhere: the other ranks' under data parallelism.
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
        std = (gather or _same)(grouped.flatten()).std()
    elif scale == "batch_tokens":
        if lengths is None:
            raise ValueError("scale='batch_tokens' needs the responses' token lengths")
        return token_whiten(centred, lengths, gather)
    else:
        raise ValueError(f"scale must be 'group', 'batch', 'batch_tokens' or 'none', not {scale!r}")
    return centred / (std + eps)


def token_whiten(values: Tensor, lengths: Tensor, gather=None) -> Tensor:
    """Per-sequence `values` [B] whitened as if broadcast over each sequence's `lengths` tokens:
    `whiten` of the [B, T] broadcast, taken back to one value per sequence (the mean and variance
    over the `gather`ed batch where given)."""
    w = lengths.to(values.device, torch.float32)
    all_w, all_v = ((gather or _same)(w), (gather or _same)(values))
    n = all_w.sum()
    mean = (all_w * all_v).sum() / n.clamp(min=1)
    var = (all_w * (all_v - mean).square()).sum() / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _same(t: Tensor) -> Tensor:
    return t


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


def gspo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                     eps_low: float = 3e-4, eps_high: float = 4e-4) -> tuple[Tensor, Tensor]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071, eqs. 5-7): the clipped surrogate on the
    sequence-level ratio s_i = exp(mean_t (log pi - log pi_old)) (the length-normalised
    sequence likelihood ratio), -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), put on
    every valid token of sequence i. TRL importance_sampling_level="sequence"; verl
    policy_loss.loss_mode=gspo. The paper's clip range is 3e-4 / 4e-4 (a sequence ratio moves far
    less than a token's). Aggregate with seq_mean_token_mean for the paper's 1/G sum_i (TRL
    loss_type="grpo"). Returns (per_token_loss [B, T], zero on padding; clipped [B, T]: the
    sequence's clipped branch is active, on its valid tokens).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    m = mask.to(logprobs.dtype)
    seq_log_ratio = ((logprobs - old_logprobs) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    ratio = seq_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()  # [B, 1]
    per_seq = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps_low, 1 + eps_high))
    valid = mask.bool()
    clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    return torch.where(valid, per_seq, 0.0), valid & clipped


def cispo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                      max_weight: float = 5.0, min_weight: float | None = None) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): REINFORCE with a clipped, stop-gradient
    importance weight, -sg(clip(r, min_weight, max_weight)) A log pi, r = pi / pi_old per token.
    Unlike PPO's clip no token loses its gradient: the weight is capped, the token still counts.
    TRL loss_type="cispo" caps at epsilon_high (ScaleRL's eps_max, 5.0 recommended) and sets no
    floor; the paper's floor 1 - eps_low is `min_weight` (None: no floor, as the paper runs it).
    Returns (per_token_loss [B, T], zero on padding; capped [B, T]: r > max_weight with A > 0,
    TRL's cispo_clip_ratio).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    weight = ratio.clamp(min=min_weight, max=max_weight).detach()
    valid = mask.bool()
    loss = torch.where(valid, -weight * advantages * logprobs, 0.0)
    return loss, valid & (ratio > max_weight) & (advantages > 0)


IS_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def rollout_is_weights(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, mode: str,
                       clip_min: float | None = None, clip_max: float | None = 3.0) -> Tensor:
    """Importance weights pi_train / pi_sampler that correct for a rollout engine whose log-probs
    differ from the trainer's (a served engine's kernels, precision or stale weights), detached.

    token_truncate     per token, clamped to [clip_min, clip_max]        TIS (Yao et al. 2025)
    token_mask         per token, 0 outside [clip_min, clip_max]         verl/TRL token_mask
    sequence_truncate  the product over the sequence's tokens, clamped   sequence-level TIS
    sequence_mask      the product, 0 outside the bounds                 MIS (TRL's default)
    TRL vllm_importance_sampling_mode/_clip_min/_clip_max (default sequence_mask, None, 3.0);
    verl algorithm.rollout_correction. Returns [B, T] (token) or [B, 1] (sequence); multiply the
    per-token loss by it. A bound of None is no bound.
    """
    if mode not in IS_MODES or mode == "none":
        raise ValueError(f"mode must be one of {IS_MODES[1:]}, not {mode!r}")
    # a token the sampler gave no log-prob for (NaN) gets weight 1, as in TRL
    diff = torch.nan_to_num((trainer_logprobs - sampler_logprobs) * mask.to(trainer_logprobs.dtype)).detach()
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = diff.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    if mode.endswith("truncate"):
        return ratio if clip_min is None and clip_max is None else ratio.clamp(min=clip_min, max=clip_max)
    outside = torch.zeros_like(ratio, dtype=torch.bool)
    if clip_min is not None:
        outside |= ratio < clip_min
    if clip_max is not None:
        outside |= ratio > clip_max
    return ratio.masked_fill(outside, 0.0)


def mismatch_metrics(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor,
                     weights: Tensor | None = None) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's on the sampled tokens: KL(sampler ||
    trainer) per token by k1 (mean log mu - log pi) and k3 (verl's rollout_corr/kl and k3_kl),
    the largest per-token gap, and the IS weights' 5/50/95% quantiles and the share they zero
    (per token, or per sequence for sequence modes)."""
    m = mask.bool() & sampler_logprobs.isfinite()
    d = (trainer_logprobs - sampler_logprobs)[m].float()  # log pi - log mu
    if d.numel() == 0:
        return {}
    out = {"mismatch/kl_k1": (-d).mean().item(), "mismatch/kl_k3": (d.clamp(max=_MAX_LOG_RATIO).exp() - d - 1).mean().item(),
           "mismatch/max_abs_logp_diff": d.abs().max().item()}
    if weights is not None:
        w = (weights[mask.bool()] if weights.shape == mask.shape else weights.flatten()).float()
        q = torch.quantile(w, torch.tensor([0.05, 0.5, 0.95]))
        out.update({"mismatch/is_w_p05": q[0].item(), "mismatch/is_w_p50": q[1].item(),
                    "mismatch/is_w_p95": q[2].item(), "mismatch/is_zeroed": (w == 0).float().mean().item()})
    return out


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
