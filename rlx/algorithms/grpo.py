"""GRPO: group-relative policy optimisation (Shao et al., 2024, DeepSeekMath), with the
switches the later papers added.

    rlx train algo=grpo model=tiny_sft                     # from the SFT base
    rlx train algo=grpo algo.scale=none algo.loss_agg=seq_mean_token_sum_norm   # Dr. GRPO
    rlx train algo=grpo algo.eps_high=0.28                 # DAPO clip-higher
    rlx train algo=grpo algo.loss=gspo algo.eps_low=3e-4 algo.eps_high=4e-4 algo.loss_agg=seq_mean_token_mean
    rlx train algo=grpo algo.loss=cispo                    # CISPO, weight capped at algo.cispo_max
    rlx train algo=grpo rollout=perturbed rollout.dtype=bfloat16 algo.is_correction=token_truncate

Per optimizer step, each of the micro-batch's prompts is sampled `group_size` times
(`rlx.rollout`), every response is scored by the `reward` config group, and the advantage of
a response is its reward minus its group's mean, divided by the group's std (`scale=group`),
the batch std (`scale=batch`), whitened over the batch's tokens (`scale=batch_tokens`, DLER) or
nothing (`scale=none`, Dr. GRPO). The loss is the clipped
surrogate (eq. 3 of the paper, with asymmetric clipping as in DAPO) plus an optional
KL term to a frozen reference (k3 estimator by default), aggregated per `loss_agg`
(`rlx.algorithms._rl.aggregate`: token_mean = TRL "dapo"/verl "token-mean";
seq_mean_token_mean = TRL "grpo"; seq_mean_token_sum_norm = TRL "dr_grpo").

Defaults (conf/algo/grpo.yaml) are TRL's, not the paper's: loss_agg=token_mean (DAPO's
aggregation; the paper averages per sequence, `seq_mean_token_mean`) and no KL term (kl_coef=0;
the paper uses the k3 estimator at beta=0.04: `algo.kl_coef=0.04 algo.reference='${model}'`).

Scope of the batch statistics: `scale=batch` and `scale=batch_tokens` take their std over one
micro-batch rollout (trainer.micro_batch_size prompts x group_size), which is the optimizer
step's batch at trainer.grad_accum=1; with accumulation each micro-batch is normalised on its own.
Under data parallelism they span the micro-batch rollouts of all ranks (rlx.distributed.batch_concat).

Behaviour and reference log-probs are taken in eval mode (no dropout), as TRL does; the loss's
log-probs in train mode.

Deviations, on purpose:
* one policy update per rollout (`num_iterations = 1`, as TRL's default): the "old"
  log-probs are the current ones detached, so the ratio is 1 and the clip only matters for
  the gradient's shape, exactly as in TRL and verl with one PPO epoch;
* the KL reference is a second copy of the model built from the same config
  (`algo.reference='${model}'`), so a resumed run compares against the same weights;
* dynamic sampling (`algo.dynamic_sampling=true`, DAPO's filter) draws its refills from the
  training stream, at most `max_draws` extra micro-batches per micro-batch (verl's
  max_num_gen_batches); if they run out it trains on the informative groups it found.

Policy terms (`algo.loss`, `rlx.algorithms._rl`): `clip` (the surrogate above), `gspo` (GSPO's
sequence-level ratio; use its clip range 3e-4/4e-4 and seq_mean_token_mean, TRL's recommended
pairing) and `cispo` (CISPO's capped stop-gradient weight on REINFORCE).

Rollout engine and mismatch correction: `rollout=` (`rlx.engines`) picks what samples; with an
engine other than rlx's own sampler the batch keeps the sampler's log-probs and the trainer's
behaviour log-probs, logs the mismatch (`mismatch/kl_k1`, `kl_k3`, IS-weight quantiles) and, with
`algo.is_correction=token_truncate|token_mask|sequence_truncate|sequence_mask`, weights the policy
term by pi_train / pi_sampler truncated or masked at [is_clip_min, is_clip_max] (TIS / MIS; TRL
vllm_importance_sampling_*, verl rollout_correction).

The pieces are shared with the variants (DLER, DOT, DRPO, GRPO-lambda) as functions in
`rlx.algorithms._group` (dynamic sampling, the rollout's tensors, the loss around a per-token
term) and `rlx.algorithms._replay` (the minibatch queue); each variant is its own class.
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


class GRPO(ReplayedRollouts):
    needs_trained_model = True

    def __init__(
        self,
        reward,
        group_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        scale: str = "group",
        loss_agg: str = "token_mean",
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        reference=None,
        dynamic_sampling: bool = False,
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
        return sample_and_score(examples, state, self.reward, n=self.group_size, max_new_tokens=self.max_new_tokens,
                                temperature=self.temperature, top_p=self.top_p, engine=self.engine)

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
