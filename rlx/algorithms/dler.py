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
"""
from __future__ import annotations

from torch import Tensor

from rlx.algorithms._sampling import Scored
from rlx.algorithms.grpo import GRPO
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


class DLER(GRPO):
    def __init__(self, reward, difficulty_aware: bool = False, easy_budget: int = 32, easy_threshold: float = 0.5,
                 scale: str = "batch_tokens", eps_high: float = 0.28, dynamic_sampling: bool = True, **grpo):
        super().__init__(reward, scale=scale, eps_high=eps_high, dynamic_sampling=dynamic_sampling, **grpo)
        if difficulty_aware and not 0 < easy_budget <= self.max_new_tokens:
            raise RlxError(f"algo.easy_budget={easy_budget} must be in (0, max_new_tokens={self.max_new_tokens}]")
        self.easy_budget = easy_budget if difficulty_aware else None
        self.easy_threshold = easy_threshold

    def _sample(self, examples, state) -> Scored:
        """Every draw is gated before dynamic sampling looks at it: an all-truncated group is an
        all-zero group and is dropped, as in the paper."""
        scored = super()._sample(examples, state)
        rollout, G = scored.rollout, self.group_size
        scored.rewards = truncation_rewards(scored.rewards, scored.correct, rollout.lengths.cpu(),
                                            rollout.finished.cpu(), G, self.easy_budget, self.easy_threshold)
        groups = scored.rewards.view(-1, G)
        scored.metrics["dler/all_zero_groups"] = (groups.max(1).values <= 0).float().mean().item()
        scored.metrics["dler/all_one_groups"] = (groups.min(1).values >= 1).float().mean().item()
        scored.metrics["dler/reward"] = scored.rewards.mean().item()
        return scored
