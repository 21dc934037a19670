"""GRPO: group-relative policy optimisation (Shao et al., 2024, DeepSeekMath), with the
switches the later papers added.

    rlx train algo=grpo model=tiny_sft                     # from the SFT base
    rlx train algo=grpo algo.scale=none algo.loss_agg=seq_mean_token_sum_norm   # Dr. GRPO
    rlx train algo=grpo algo.eps_high=0.28                 # DAPO clip-higher

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
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlx.algorithms._rl import (
    AGG_MODES,
    aggregate,
    aggregation_weight,
    clipped_policy_loss,
    group_advantages,
    kl_penalty,
    masked_mean,
)
from rlx.algorithms._sampling import Scored, sample_and_score
from rlx.data.stream import draw_more
from rlx.errors import RlxError
from rlx.rollout import Rollout, eval_mode, sequence_logprobs, sequence_logprobs_and_entropy

SCALES = ("group", "batch", "batch_tokens", "none")


class GRPO:
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
    ):
        if loss_agg not in AGG_MODES:
            raise RlxError(f"unknown algo.loss_agg={loss_agg!r}; valid: {', '.join(AGG_MODES)}")
        if scale not in SCALES:
            raise RlxError(f"unknown algo.scale={scale!r}; valid: {', '.join(SCALES)}")
        if group_size < 2:
            raise RlxError("algo.group_size must be >= 2: advantages are relative to the group")
        if kl_coef > 0 and reference is None:
            raise RlxError("algo.kl_coef > 0 needs a reference model: add algo.reference='${model}'")
        if minibatches < 1:
            raise RlxError("algo.minibatches must be >= 1")
        self.reward, self.group_size, self.max_new_tokens = reward, group_size, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.eps_low, self.eps_high, self.scale, self.loss_agg = eps_low, eps_high, scale, loss_agg
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.dynamic_sampling, self.max_draws, self.minibatches = dynamic_sampling, max_draws, minibatches
        self._queue: list[dict] = []
        self.reference = reference.model.eval().requires_grad_(False) if reference is not None else None

    # ------------------------------------------------------------------ rollouts

    def _sample(self, examples, state) -> Scored:
        return sample_and_score(examples, state, self.reward, n=self.group_size, max_new_tokens=self.max_new_tokens,
                                temperature=self.temperature, top_p=self.top_p)

    def _informative(self, examples, state) -> tuple[Scored, dict]:
        """DAPO's dynamic sampling: keep the groups whose rewards differ, drawing more prompts from
        the stream until there are as many as asked for (or `max_draws` extra draws), and
        truncate to that many. The rollout metrics are those of the first draw (the plain batch)."""
        G = self.group_size
        draws = [self._sample(examples, state)]
        want = len(draws[0].rewards) // G
        spread = lambda: torch.cat([d.rewards for d in draws]).view(-1, G).std(dim=1) > 0  # per group
        while int(spread().sum()) < want and len(draws) <= self.max_draws and (extra := draw_more(examples)):
            draws.append(self._sample(extra, state))
        informative = spread()
        groups = informative.nonzero().flatten()[:want]
        if len(groups) == 0:  # nothing informative: train on the first draw's zeros, as GRPO would
            groups = torch.arange(want)
        rows = (groups[:, None] * G + torch.arange(G)).flatten()
        merged = Rollout.concat([d.rollout for d in draws], state.tokenizer.pad_token_id)
        examples_all = [ex for d in draws for ex in d.examples]
        scored = Scored([examples_all[r] for r in rows], merged.select(rows.to(merged.prompt_ids.device)),
                        torch.cat([d.rewards for d in draws])[rows], torch.cat([d.correct for d in draws])[rows],
                        dict(draws[0].metrics))
        scored.metrics["rl/rollout_s"] = sum(d.metrics["rl/rollout_s"] for d in draws)
        return scored, {"rl/groups_with_signal": informative.float().mean().item(), "rl/draws": len(draws)}

    def make_batch(self, examples, state) -> dict:
        if not self._queue:  # only now are `examples` drawn from the stream
            self._queue = self._rollout(examples, state)
        device = state.model.device  # a resumed queue comes back on the CPU
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self._queue.pop(0).items()}

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {"queue": self._queue}  # the minibatches of a rollout still being replayed

    def load_state_dict(self, state: dict) -> None:
        self._queue = list(state.get("queue", []))

    @torch.no_grad()
    def _rollout(self, examples, state) -> list[dict]:
        """Sample, score and compute advantages; cut the rollout into `minibatches` minibatches of
        whole groups (one optimizer step each, verl's ppo_mini_batch_size)."""
        model = state.model
        if self.dynamic_sampling:
            scored, extra = self._informative(examples, state)
        else:
            scored, extra = self._sample(examples, state), {}
        advantages = self.advantages(scored).to(model.device)
        input_ids, attention_mask = scored.rollout.sequences()
        mask = scored.rollout.response_mask.float()
        data = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": mask,
                "advantages": advantages}
        if self.minibatches > 1:  # later minibatches see a policy that has moved: keep the behaviour's
            with eval_mode(model):  # without dropout, as TRL computes them
                data["old_logprobs"] = sequence_logprobs(model, input_ids, attention_mask, mask.shape[1],
                                                         self.temperature)
        if self.reference is not None:
            data["ref_logprobs"] = sequence_logprobs(self.reference, input_ids, attention_mask, mask.shape[1],
                                                     self.temperature)
        metrics = {**scored.metrics, **extra}
        groups = len(advantages) // self.group_size
        n = min(self.minibatches, groups)  # dynamic sampling may keep fewer groups than minibatches
        order = torch.randperm(groups) if n > 1 else torch.arange(groups)
        queue = []
        for chunk in order.tensor_split(n):
            rows = (chunk[:, None] * self.group_size + torch.arange(self.group_size)).flatten().to(mask.device)
            mb = {k: v[rows] for k, v in data.items()}
            mb["num_targets"] = int(aggregation_weight(mb["response_mask"], self.loss_agg, self.max_new_tokens))
            mb["num_tokens"] = int(mb["response_mask"].sum())  # generated tokens trained on
            mb["metrics"] = metrics
            queue.append(mb)
        return queue

    def advantages(self, scored: Scored) -> Tensor:
        """[B] advantage per response (variants override this to shape rewards by group or batch;
        they may add their own numbers to `scored.metrics`)."""
        return group_advantages(scored.rewards, self.group_size, scale=self.scale, lengths=scored.rollout.lengths)

    # ------------------------------------------------------------------ loss

    def policy_loss(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                    mask: Tensor) -> tuple[Tensor, dict]:
        """Per-token policy loss [B, T] and its metrics: the clipped surrogate."""
        per_token, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, mask,
                                                 self.eps_low, self.eps_high)
        return per_token, {"rl/clip_frac": masked_mean(clipped.float(), mask).item()}

    def loss(self, batch: dict, state):
        mask = batch["response_mask"]
        logprobs, entropy = sequence_logprobs_and_entropy(state.model, batch["input_ids"], batch["attention_mask"],
                                                          mask.shape[1], self.temperature)
        old = batch.get("old_logprobs", logprobs.detach())  # one update per rollout: old = current
        per_token, policy_metrics = self.policy_loss(logprobs, old, batch["advantages"], mask)
        metrics = {**batch["metrics"], **policy_metrics}
        if self.reference is not None:
            kl = kl_penalty(logprobs, batch["ref_logprobs"], self.kl_estimator)
            per_token = per_token + self.kl_coef * kl
            metrics["rl/kl"] = masked_mean(kl, mask).item()
        loss = aggregate(per_token, mask, self.loss_agg, self.max_new_tokens)
        metrics["rl/entropy"] = masked_mean(entropy, mask).item()
        metrics["train/loss"] = loss.detach()
        return loss, metrics
