"""DLER: Doing Length pEnalty Right (Liu et al., 2025, arXiv 2510.15110; NVlabs/DLER).

    rlx train algo=dler model=tiny_sft
    rlx train algo=dler model=tiny_sft algo.difficulty_aware=true       # DA-DLER
    rlx merge BASE TUNED OUT --keep 0.25 --scale 0.7                    # update-selective merging

The paper's point is that a length penalty as crude as truncation works if the optimiser is
fixed, and DLER is that fix, GRPO with three changes (the official code is a configuration of
verl's DAPO recipe, not new code, and so is this module, plus the penalty):

* the truncation penalty  R'_i = R_i * 1[|o_i| <= L_T]  with generation capped at L_T
  (`max_new_tokens`): a response that hits the cap scores 0 even if an answer is in it;
* batch normalisation (eq. 3): group-centred rewards whitened over every response token of the
  batch (`scale=batch_tokens`, verl's reinforce_plus_plus_baseline), instead of GRPO's per-group
  std, whose estimate truncation zeros bias;
* clip-higher (eps_high 0.28 > eps_low 0.2) against entropy collapse, and DAPO's dynamic
  sampling (drop groups whose rewards are all equal, refill; `max_draws`), against the sparse
  signal of all-truncated and all-solved groups. Both are GRPO options; DLER only sets them.

Difficulty-aware DLER (`difficulty_aware=true`, the paper's section on DA-DLER): a prompt whose
group solves it at least `easy_threshold` of the time gets the tighter budget `easy_budget`
(the paper: c_q >= 0.5 -> 2000 tokens, else 4000). Which rollouts estimate c_q the paper does
not say; rlx generates with the full budget, computes c_q from the checker on that group, then
zeroes the reward of every rollout longer than its prompt's budget (an interpretation). The
paper runs it as 150 more steps after DLER; here it is a switch, so either schedule works.

Update-selective merging (`rlx.merge.merge_updates`, `rlx merge`): theta_base + scale * TopK_keep(|Delta|)
* Delta, Delta = theta_DLER - theta_base, keeping the `keep` largest-magnitude entries of each
tensor (the paper: 25%, scale 0.7; per-tensor ranking is rlx's reading of "TIES-inspired").

Defaults (`conf/algo/dler.yaml`) are the paper's (Table 4) except the sizes, which are the
embedded task's: L_T is 48 tokens where the tiny base's traces without re-checks are ~30 and
with them ~66 (the paper's 4000 against R1's 7-10k). Deviations, on purpose:
* the KL loss to the reference is k3 (verl's default, which the official script leaves in
  place) at 5e-4; the paper's Table 4 says k2 (`mse`): `algo.kl_estimator=k2` for that;
* dual-clip (c = 10) is not applied: it bounds the loss of negative-advantage tokens whose
  ratio exceeds c, which only matters far off-policy, and rlx's replay is at most a few
  minibatches old;
* batch normalisation whitens over one micro-batch rollout (trainer.micro_batch_size prompts,
  after dynamic sampling), the optimizer step's batch at trainer.grad_accum=1; with accumulation
  each micro-batch is whitened on its own;
* the truncation gate uses the rollout's `finished` flag (EOS emitted) rather than a length
  test, which is the same thing when generation is capped at L_T.

The rollout, minibatches and loss are GRPO's, from the same shared pieces (`rlx.algorithms._group`);
DLER's own part is `_sample`, the gate on every draw.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlx.algorithms._group import (
    check_settings,
    dynamic_sampling,
    frozen,
    group_minibatches,
    grpo_loss,
    policy_term,
    rollout_tensors,
)
from rlx.algorithms._replay import Replay, ReplayedRollouts
from rlx.algorithms._rl import aggregation_weight, group_advantages
from rlx.algorithms._sampling import Scored, sample_and_score
from rlx.distributed import batch_concat
from rlx.errors import RlxError


def truncation_rewards(rewards: Tensor, correct: Tensor, lengths: Tensor, finished: Tensor, group_size: int,
                       easy_budget: int | None = None, easy_threshold: float = 0.5) -> Tensor:
    """DLER's truncation penalty R' = R * 1[finished]; with `easy_budget`, also 0 for responses
    longer than it in groups whose correctness ratio c_q = mean(correct) >= `easy_threshold`."""
    gated = rewards * finished.to(rewards.dtype)
    if easy_budget is None:
        return gated
    ratio = correct.float().view(-1, group_size).mean(1).repeat_interleave(group_size)
    over = (ratio >= easy_threshold) & (lengths > easy_budget)
    return gated.masked_fill(over, 0.0)


class DLER(ReplayedRollouts):
    needs_trained_model = True

    def __init__(
        self,
        reward,
        difficulty_aware: bool = False,
        easy_budget: int = 32,
        easy_threshold: float = 0.5,
        group_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eps_low: float = 0.2,
        eps_high: float = 0.28,
        scale: str = "batch_tokens",
        loss_agg: str = "token_mean",
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        reference=None,
        dynamic_sampling: bool = True,
        max_draws: int = 4,
        minibatches: int = 1,
        loss: str = "clip",
        cispo_max: float = 5.0,
        cispo_min: float | None = None,
        engine=None,
        is_correction: str = "none",
        is_clip_min: float | None = None,
        is_clip_max: float | None = 3.0,
    ):
        check_settings(group_size, scale, loss_agg, kl_coef, reference, minibatches, loss, is_correction,
                       engine, top_p)
        if difficulty_aware and not 0 < easy_budget <= max_new_tokens:
            raise RlxError(f"algo.easy_budget={easy_budget} must be in (0, max_new_tokens={max_new_tokens}]")
        self.easy_budget = easy_budget if difficulty_aware else None
        self.easy_threshold = easy_threshold
        self.reward, self.group_size, self.max_new_tokens = reward, group_size, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.eps_low, self.eps_high, self.scale, self.loss_agg = eps_low, eps_high, scale, loss_agg
        self.kl_coef, self.kl_estimator, self.reference = kl_coef, kl_estimator, frozen(reference)
        self.dynamic_sampling, self.max_draws, self.minibatches = dynamic_sampling, max_draws, minibatches
        self.loss_kind, self.cispo_max, self.cispo_min = loss, cispo_max, cispo_min
        self.engine, self.is_correction, self.is_clip_min, self.is_clip_max = engine or None, is_correction, \
            is_clip_min, is_clip_max
        self._queue = Replay()  # the minibatches of a rollout still being replayed

    def _sample(self, examples, state) -> Scored:
        """Every draw is gated before dynamic sampling looks at it: an all-truncated group is an
        all-zero group and is dropped, as in the paper."""
        scored = sample_and_score(examples, state, self.reward, n=self.group_size, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p, engine=self.engine)
        rollout, G = scored.rollout, self.group_size
        scored.rewards = truncation_rewards(scored.rewards, scored.correct, rollout.lengths.cpu(),
                                            rollout.finished.cpu(), G, self.easy_budget, self.easy_threshold)
        groups = scored.rewards.view(-1, G)
        scored.metrics["dler/all_zero_groups"] = (groups.max(1).values <= 0).float().mean().item()
        scored.metrics["dler/all_one_groups"] = (groups.min(1).values >= 1).float().mean().item()
        scored.metrics["dler/reward"] = scored.rewards.mean().item()
        return scored

    # The rollout and the loss are GRPO's, kept word for word as in rlx/algorithms/grpo.py.

    @torch.no_grad()
    def _rollout(self, examples, state) -> list[dict]:
        """Sample (with dynamic sampling, keep the informative groups), score, compute advantages,
        and cut the rollout into `minibatches` minibatches of whole groups."""
        if self.dynamic_sampling:
            draw = lambda ex: self._sample(ex, state)
            scored, extra = dynamic_sampling(examples, draw, self.group_size, self.max_draws,
                                             state.tokenizer.pad_token_id)
        else:
            scored, extra = self._sample(examples, state), {}
        advantages = self.advantages(scored).to(state.model.device)
        data = rollout_tensors(scored, state, self.temperature, behaviour=self.minibatches > 1,
                               reference=self.reference, sampler=self.engine is not None)
        data["advantages"] = advantages
        weight = lambda mask: aggregation_weight(mask, self.loss_agg, self.max_new_tokens)
        return group_minibatches(data, self.minibatches, self.group_size, weight, {**scored.metrics, **extra})

    def advantages(self, scored: Scored) -> Tensor:
        """[B] advantage per response: its reward against its group's, scaled per `scale`."""
        return group_advantages(scored.rewards, self.group_size, scale=self.scale, lengths=scored.rollout.lengths,
                                gather=batch_concat)  # batch statistics span every rank's rollouts

    def loss(self, batch: dict, state):
        term = policy_term(self.loss_kind, self.eps_low, self.eps_high, self.cispo_max, self.cispo_min)
        return grpo_loss(batch, state, term, temperature=self.temperature, loss_agg=self.loss_agg,
                         max_len=self.max_new_tokens, reference=self.reference, kl_coef=self.kl_coef,
                         kl_estimator=self.kl_estimator, is_correction=self.is_correction,
                         is_clip_min=self.is_clip_min, is_clip_max=self.is_clip_max)
