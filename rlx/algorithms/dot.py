"""DOT: Dynamic Outlier Truncation, "Anti-Length Shift" (Wu et al., 2026, arXiv 2601.03969,
ACL 2026; official code U-rara/DOT, projects/dot/ on top of verl 0.6.1).

    rlx train algo=dot model=tiny_sft
    rlx train algo=dot model=tiny_sft algo.alpha=1e9 algo.loss_mode=clip    # DOT off: GRPO + one-round sampling

During RL a model grows longer even on prompts it already solves every time; those groups have
equal rewards, so GRPO gives them no gradient and nothing pushes back. DOT adds a signal there
and nowhere else. In a group whose success rate is at least `success_threshold` (all correct by
default), a rollout whose length is a statistical outlier is cut short and checked again; if the
cut removed the final answer it now scores 0, the group has a spread, and the usual group
advantage pushes against the over-long reasoning. Groups with a failure are never touched.

One rollout, in order (the official dot_ray_trainer):
1. Predictive Dynamic Sampling (PDS) fetches ceil(B * f) prompts in one round, B = the
   micro-batch's prompts (`trainer.micro_batch_size`), the extra ones from the training stream:
       f = clip((1 / mean(p)) * (1 + std(p)), pds_min, pds_max)     std: population (numpy's)
   over the last `pds_history` pass rates p = groups kept / groups sampled; f = pds_init before
   any history and pds_max when mean(p) = 0.
2. `group_size` rollouts per prompt, scored by the `reward` group and the task's checker.
3. The DOT cut, before any filtering (`_sample`). For group q with lengths L_i:
       T(q) = floor(mean_i L_i + alpha * std_i L_i)                   std: sample (n - 1)
       cut row i  if  L_i > T(q)  and  L_i - T(q) >= m               m: `margin` tokens, or if
                                                                     0 < m < 1, max(floor(m L_i), 16)
   A cut row keeps its first T(q) tokens (response_mask and the attention mask 0 after them,
   unfinished); its shortened text is scored again, reward and checker both.
4. Keep the groups whose rewards differ (DAPO's filter; a group DOT broke now qualifies), the
   first B of them.
5. GRPO's group advantage A_i = (R_i - mean R) / std R, and `minibatches` updates with KL-Cov
   (from "The Entropy Mechanism of RL for Reasoning LMs"; verl loss_mode=kl_cov), no clipping:
       l_t = -A_t rho_t + k |log pi_theta,t - log pi_old,t| * 1[t in top-K]
   rho_t = pi_theta / pi_old, top-K = the max(1, floor(kl_cov_ratio * N)) valid tokens with the
   largest (A_t - mean A)(log pi_theta,t - mean log pi_theta), N = valid tokens in the loss call;
   aggregated seq_mean_token_mean. With one minibatch pi_old = pi_theta, so the KL term is 0
   with 0 gradient: it only acts on the later minibatches of a rollout (the paper: 4).

Logged, over everything a rollout sampled: truncation/easy_ratio (groups the gate lets through),
truncation/actually_truncated (rows cut, a count per rollout), truncation/broken_answer_ratio
(correct rows of those groups that the cut made incorrect), the official names; rl/response_len,
rl/accuracy and reward/* after the cut; pds/factor, pds/prompts, pds/groups_kept and
rl/groups_with_signal (the pass rate); rl/ppo_kl (mean |log ratio|, verl actor/ppo_kl) and
rl/kl_cov_frac (share of tokens given the KL term).

Deviations, on purpose:
* The gate uses the task's checker (`Scored.correct`); the official code tests reward == 1.
  The same with `reward=correct`; with a shaped reward, "solved" still means the checker said so.
* Only the cut rows are re-scored (the official code re-scores the whole batch; rewards are
  per response, so the values agree). reward/<term> is corrected by the cut rows' change.
* ceil(B * f) prompts, not floor: at rlx's micro-batches floor(4 * 1.2) = 4 would not oversample.
* Fewer than B groups kept: rlx trains on those, with no padding. The official code pads to B
  with copies of kept groups whose response_mask is 0, to keep tensor shapes fixed. The copies
  add no gradient but still take rows in verl's minibatches and in its micro-batch weighting
  (rows / minibatch size), so a step with few survivors shrinks by an amount that depends on where
  the copies land, and a minibatch of copies only still steps the optimizer (Adam's moments move
  it). rlx's seq_mean_token_mean averages over the kept sequences, so every update has a full
  batch's size whatever survived, and the rollout is cut into min(minibatches, groups kept)
  minibatches. No group kept at all: train on the micro-batch's own groups, whose advantages are
  all 0, as GRPO does.
* KL-Cov ranks tokens per loss call (one micro-batch of a minibatch), as verl does per
  micro-batch; rho's log is clamped to +-20 before exp, as in rlx's clipped loss.
* The PDS history has one entry per micro-batch rollout and is part of the checkpoint, so a
  resumed run draws exactly as many prompts as an uninterrupted one.
* rl/truncated still means "cut by max_new_tokens"; rows cut by DOT are counted separately.

Defaults (conf/algo/dot.yaml) are the paper's (runs/run_dot.sh) except the sizes, which are the
embedded task's. G = 8, not 32 (as conf/algo/grpo.yaml, for comparisons). alpha = 2.2, not 3: a
response's sample z-score can never exceed (G - 1) / sqrt(G), 2.47 at G = 8 (5.48 at G = 32),
so alpha = 3 at G = 8 would never cut anything; 2.2 gives about the paper's share of responses
beyond the cut-off. m = 8 tokens, about one line of the tiny model's traces; the paper's 32 is
under 1% of its 4-8K-token responses and would be a third of ours. max_new_tokens = 128.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import replace

import torch
from torch import Tensor

from rlx.algorithms._group import (
    check_settings,
    clip_term,
    frozen,
    group_minibatches,
    grpo_loss,
    informative_groups,
    keep_groups,
    rollout_tensors,
)
from rlx.algorithms._replay import Replay, ReplayedRollouts
from rlx.algorithms._rl import _MAX_LOG_RATIO, aggregation_weight, group_advantages, masked_mean
from rlx.algorithms._sampling import Scored, sample_and_score
from rlx.data.stream import draw_more
from rlx.distributed import batch_concat
from rlx.errors import RlxError
from rlx.rollout import Rollout

LOSS_MODES = ("kl_cov", "clip")
_FRACTION_FLOOR = 16  # the official code's least margin, in tokens, when m is a fraction of L_i

# ---------------------------------------------------------------------------- DOT cut


def outlier_cutoffs(lengths: Tensor, correct: Tensor, group_size: int, alpha: float,
                    success_threshold: float) -> Tensor:
    """[groups] float64 cut-off T(q) = floor(mean L + alpha * std L) (std with n - 1, computed
    exactly with `statistics`, as the official code does), +inf where DOT does not apply: the
    group's success rate mean(correct) is below `success_threshold`, or nothing in it is correct."""
    cutoffs = []
    for L, c in zip(lengths.view(-1, group_size).tolist(), correct.view(-1, group_size).tolist()):
        if statistics.fmean(c) < success_threshold or not any(c):
            cutoffs.append(math.inf)
            continue
        L = [int(x) for x in L]
        cutoffs.append(math.floor(statistics.mean(L) + alpha * statistics.stdev(L)))
    return torch.tensor(cutoffs, dtype=torch.float64)


def truncation_rows(lengths: Tensor, cutoffs: Tensor, group_size: int, margin: float) -> Tensor:
    """[B] bool: rows with L_i > T(q) and L_i - T(q) >= m, where m is `margin` tokens, or for
    0 < margin < 1 the fraction max(floor(margin * L_i), 16)."""
    L = lengths.double()
    T = cutoffs.repeat_interleave(group_size)
    if 0 < margin < 1:
        m = (margin * L).floor().clamp(min=_FRACTION_FLOOR)
    else:
        m = torch.full_like(L, math.floor(margin))
    return (L > T) & (L - T >= m)


def cut_responses(rollout: Rollout, keep: Tensor, pad_token_id: int) -> Rollout:
    """Keep the first keep[i] response tokens of row i: mask, ids (pad), log-probs (0) after them
    cleared, and a row that lost tokens marked unfinished."""
    cols = torch.arange(rollout.response_ids.shape[1], device=keep.device)
    drop = cols[None, :] >= keep[:, None]
    lost = (drop & rollout.response_mask.bool()).any(-1)
    return replace(rollout, response_ids=rollout.response_ids.masked_fill(drop, pad_token_id),
                   response_mask=rollout.response_mask.masked_fill(drop, 0),
                   logprobs=rollout.logprobs.masked_fill(drop, 0.0), finished=rollout.finished & ~lost)


# ---------------------------------------------------------------------------- PDS


def pds_factor(history: list[float], f_init: float, f_min: float, f_max: float) -> float:
    """Predictive Dynamic Sampling's oversampling factor from the recent pass rates:
    clip((1 / mean p) * (1 + std p), f_min, f_max) with the population std (numpy's, as the
    official code); f_init with no history, f_max when every recent group was filtered out."""
    if not history:
        return f_init
    mean = statistics.fmean(history)
    if mean == 0:
        return f_max
    return min(max((1 + statistics.pstdev(history)) / mean, f_min), f_max)


def prompts_to_draw(batch: int, factor: float) -> int:
    """ceil(B * f), rounded first so that 5 * 1.2 = 6.000000000000001 asks for 6, not 7."""
    return math.ceil(round(batch * factor, 9))


# ---------------------------------------------------------------------------- KL-Cov


def kl_cov_tokens(logprobs: Tensor, advantages: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """[B, T] bool: the max(1, floor(ratio * N)) of the N valid tokens with the largest
    (A - mean A)(log pi - mean log pi), means over the valid tokens; none if ratio or N is 0."""
    valid = mask.bool()
    n = int(valid.sum())
    selected = torch.zeros_like(valid)
    if ratio == 0 or n == 0:
        return selected
    adv, logp = advantages.detach()[valid], logprobs.detach()[valid]
    cov = (adv - adv.mean()) * (logp - logp.mean())
    top = cov.topk(max(1, int(n * ratio))).indices
    flat = selected.view(-1)
    flat[valid.view(-1).nonzero().squeeze(-1)[top]] = True
    return selected


def kl_cov_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, ratio: float,
                coef: float) -> tuple[Tensor, Tensor]:
    """KL-Cov per token [B, T] (0 on padding, no clipping): -A rho, plus coef * |log pi - log pi_old|
    on the tokens `kl_cov_tokens` selects. `advantages` is [B] or [B, T]. Returns (loss, selected)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    log_ratio = logprobs - old_logprobs
    rho = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    selected = kl_cov_tokens(logprobs, advantages, mask, ratio)
    per_token = -advantages * rho + coef * log_ratio.abs() * selected
    return torch.where(mask.bool(), per_token, 0.0), selected


# ---------------------------------------------------------------------------- the algorithm


class DOT(ReplayedRollouts):
    needs_trained_model = True

    def __init__(
        self,
        reward,
        alpha: float = 2.2,
        margin: float = 8,
        success_threshold: float = 1.0,
        loss_mode: str = "kl_cov",
        kl_cov_ratio: float = 0.002,
        kl_cov_coef: float = 1.0,
        pds_history: int = 20,
        pds_init: float = 1.5,
        pds_min: float = 1.2,
        pds_max: float = 5.0,
        group_size: int = 8,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        scale: str = "group",
        loss_agg: str = "seq_mean_token_mean",
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        reference=None,
        dynamic_sampling: bool = True,
        minibatches: int = 4,
    ):
        check_settings(group_size, scale, loss_agg, kl_coef, reference, minibatches)
        _check(alpha, margin, success_threshold, loss_mode, kl_cov_ratio, kl_cov_coef, pds_history,
               pds_init, pds_min, pds_max)
        self.alpha, self.margin, self.success_threshold = alpha, margin, success_threshold
        self.loss_mode, self.kl_cov_ratio, self.kl_cov_coef = loss_mode, kl_cov_ratio, kl_cov_coef
        self.pds_history, self.pds_init, self.pds_min, self.pds_max = pds_history, pds_init, pds_min, pds_max
        self.reward, self.group_size, self.max_new_tokens = reward, group_size, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.eps_low, self.eps_high, self.scale, self.loss_agg = eps_low, eps_high, scale, loss_agg
        self.kl_coef, self.kl_estimator, self.reference = kl_coef, kl_estimator, frozen(reference)
        self.dynamic_sampling, self.minibatches = dynamic_sampling, minibatches
        self._pass_rates: list[float] = []  # PDS: groups kept / groups sampled, newest last
        self._queue = Replay()  # the minibatches of a rollout still being replayed

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pass_rates": list(self._pass_rates)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pass_rates = list(state.get("pass_rates", []))

    # ------------------------------------------------------------------ the cut

    def _sample(self, examples, state) -> Scored:
        """Every draw is cut before dynamic sampling looks at it, so a group DOT broke survives."""
        scored = sample_and_score(examples, state, self.reward, n=self.group_size, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p)
        return self._truncate(scored, state)

    def _truncate(self, scored: Scored, state) -> Scored:
        """The cut of one draw, and its metrics under the official code's names."""
        G, rollout = self.group_size, scored.rollout
        lengths = rollout.lengths.cpu()
        cutoffs = outlier_cutoffs(lengths, scored.correct, G, self.alpha, self.success_threshold)
        rows = truncation_rows(lengths, cutoffs, G, self.margin)
        easy = torch.isfinite(cutoffs).repeat_interleave(G)
        before = scored.correct[easy].sum().item()
        if rows.any():
            keep = torch.where(rows, cutoffs.repeat_interleave(G), float(rollout.response_ids.shape[1]))
            cut = cut_responses(rollout, keep.long().to(rollout.response_ids.device), state.tokenizer.pad_token_id)
            scored = self._rescore(scored, cut, rows.nonzero().squeeze(-1), state)
        after = scored.correct[easy].sum().item()
        scored.metrics.update({
            "truncation/easy_ratio": torch.isfinite(cutoffs).float().mean().item(),
            "truncation/actually_truncated": float(rows.sum()),
            "truncation/broken_answer_ratio": (before - after) / before if before else 0.0,
        })
        return scored

    def _rescore(self, scored: Scored, cut: Rollout, rows: Tensor, state) -> Scored:
        """Reward and checker on the cut rows' shortened text; the rollout metrics that change."""
        examples, on = [scored.examples[i] for i in rows], rows.to(cut.response_ids.device)
        old_text, new_text = (state.tokenizer.batch_decode(r.response_ids[on], skip_special_tokens=True)
                              for r in (scored.rollout, cut))
        lengths = cut.lengths.float().cpu()
        new_rewards, new_terms = self.reward(new_text, examples, state.task, lengths[rows])
        # Rewards are per response, so the old text scores what it scored: each term's batch mean
        # moves by the cut rows' change times their share of the batch.
        _, old_terms = self.reward(old_text, examples, state.task, scored.rollout.lengths.float().cpu()[rows])
        share = len(rows) / len(lengths)
        rewards, correct = scored.rewards.clone(), scored.correct.clone()
        rewards[rows] = new_rewards.float().cpu()
        correct[rows] = torch.tensor([state.task.score(t, ex) for t, ex in zip(new_text, examples)],
                                     dtype=correct.dtype)
        terms = {k: scored.metrics[k] + share * (v - old_terms[k]) for k, v in new_terms.items()}
        metrics = {**scored.metrics, **terms, "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
                   "rl/accuracy": correct.mean().item(), "rl/response_len": lengths.mean().item(),
                   "rl/response_len_p90": lengths.quantile(0.9).item(), "rl/response_len_max": lengths.max().item()}
        return Scored(scored.examples, cut, rewards, correct, metrics)

    # ------------------------------------------------------------------ PDS

    def _informative(self, examples, state) -> tuple[Scored, dict]:
        """Predictive Dynamic Sampling: one round of ceil(B * f) prompts, keep the groups whose
        rewards differ, the first B of them; fewer survive, train on those."""
        B, G = len(examples), self.group_size
        factor = pds_factor(self._pass_rates, self.pds_init, self.pds_min, self.pds_max)
        scored = self._sample(self._prompts(examples, prompts_to_draw(B, factor)), state)
        spread = informative_groups(scored.rewards, G)
        self._pass_rates = [*self._pass_rates, spread.float().mean().item()][-self.pds_history:]
        kept = keep_groups(scored, spread, B, G)  # none: the micro-batch's own groups, zero advantages
        return kept, {"rl/groups_with_signal": spread.float().mean().item(), "pds/factor": factor,
                      "pds/prompts": float(len(spread)), "pds/groups_kept": float(spread.sum().clamp(max=B))}

    @staticmethod
    def _prompts(examples, n: int) -> list[dict]:
        """The micro-batch's prompts, then the stream's next micro-batches, cut to n (the rest of
        the last one is skipped, as an epoch's tail is)."""
        prompts = list(examples)
        while len(prompts) < n and (extra := draw_more(examples)):
            prompts += extra
        return prompts[:n]

    # ------------------------------------------------------------------ rollout and loss
    # GRPO's (rlx/algorithms/grpo.py), word for word but for PDS in place of DAPO's dynamic
    # sampling and the KL-Cov term in place of the clipped surrogate.

    @torch.no_grad()
    def _rollout(self, examples, state) -> list[dict]:
        """Sample (with PDS, keep the informative groups), score, compute advantages, and cut the
        rollout into `minibatches` minibatches of whole groups."""
        if self.dynamic_sampling:
            scored, extra = self._informative(examples, state)
        else:
            scored, extra = self._sample(examples, state), {}
        advantages = self.advantages(scored).to(state.model.device)
        data = rollout_tensors(scored, state, self.temperature, behaviour=self.minibatches > 1,
                               reference=self.reference)
        data["advantages"] = advantages
        weight = lambda mask: aggregation_weight(mask, self.loss_agg, self.max_new_tokens)
        return group_minibatches(data, self.minibatches, self.group_size, weight, {**scored.metrics, **extra})

    def advantages(self, scored: Scored) -> Tensor:
        """[B] advantage per response: its reward against its group's, scaled per `scale`."""
        return group_advantages(scored.rewards, self.group_size, scale=self.scale, lengths=scored.rollout.lengths,
                                gather=batch_concat)  # batch statistics span every rank's rollouts

    def loss(self, batch: dict, state):
        """KL-Cov (`loss_mode=kl_cov`), or GRPO's clipped surrogate (`loss_mode=clip`)."""
        term = clip_term(self.eps_low, self.eps_high) if self.loss_mode == "clip" else self._kl_cov
        return grpo_loss(batch, state, term, temperature=self.temperature, loss_agg=self.loss_agg,
                         max_len=self.max_new_tokens, reference=self.reference, kl_coef=self.kl_coef,
                         kl_estimator=self.kl_estimator)

    def _kl_cov(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        per_token, selected = kl_cov_loss(logprobs, old_logprobs, advantages, mask, self.kl_cov_ratio,
                                          self.kl_cov_coef)
        return per_token, {"rl/ppo_kl": masked_mean((logprobs - old_logprobs).abs().detach(), mask).item(),
                           "rl/kl_cov_frac": masked_mean(selected.float(), mask).item()}


def _check(alpha, margin, success_threshold, loss_mode, kl_cov_ratio, kl_cov_coef, pds_history, pds_init,
           pds_min, pds_max) -> None:
    """One clear line per bad value."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise RlxError(f"algo.alpha={alpha} must be a finite number >= 0 (a large value such as 1e9 turns the cut off)")
    if not margin >= 0:
        raise RlxError(f"algo.margin={margin} must be >= 0: tokens, or a fraction of the length if below 1")
    if not 0 <= success_threshold <= 1:
        raise RlxError(f"algo.success_threshold={success_threshold} must be a success rate in [0, 1]")
    if loss_mode not in LOSS_MODES:
        raise RlxError(f"unknown algo.loss_mode={loss_mode!r}; valid: {', '.join(LOSS_MODES)}")
    if not 0 <= kl_cov_ratio <= 1 or not kl_cov_coef >= 0:
        raise RlxError(f"algo.kl_cov_ratio={kl_cov_ratio} must be in [0, 1] and algo.kl_cov_coef={kl_cov_coef} >= 0")
    if pds_history < 1:
        raise RlxError(f"algo.pds_history={pds_history} must be >= 1 (pass rates remembered)")
    if not 1 <= pds_min <= pds_max or not 1 <= pds_init:
        raise RlxError(f"PDS factors must satisfy 1 <= algo.pds_min <= algo.pds_max and algo.pds_init >= 1; "
                       f"got min {pds_min}, max {pds_max}, init {pds_init}")
