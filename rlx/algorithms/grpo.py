"""GRPO: group-relative policy optimisation (Shao et al., 2024, DeepSeekMath), with the
switches the later papers added.

    rlx train algo=grpo model=tiny_sft                     # from the SFT base
    rlx train algo=grpo algo.scale=none algo.loss_agg=seq_mean_token_sum_norm   # Dr. GRPO
    rlx train algo=grpo algo.eps_high=0.28                 # DAPO clip-higher

Per optimizer step, each of the micro-batch's prompts is sampled `group_size` times
(`rlx.rollout`), every response is scored by the `reward` config group, and the advantage of
a response is its reward minus its group's mean, divided by the group's std (`scale=group`),
the batch std (`scale=batch`) or nothing (`scale=none`, Dr. GRPO). The loss is the clipped
surrogate (eq. 3 of the paper, with asymmetric clipping as in DAPO) plus an optional
KL term to a frozen reference (k3 estimator by default), aggregated per `loss_agg`
(`rlx.algorithms._rl.aggregate`: token_mean = TRL "dapo"/verl "token-mean";
seq_mean_token_mean = TRL "grpo"; seq_mean_token_sum_norm = TRL "dr_grpo").

Deviations, on purpose:
* one policy update per rollout (`num_iterations = 1`, as TRL's default): the "old"
  log-probs are the current ones detached, so the ratio is 1 and the clip only matters for
  the gradient's shape, exactly as in TRL and verl with one PPO epoch;
* the KL reference is a second copy of the model built from the same config
  (`algo.reference='${model}'`), so a resumed run compares against the same weights;
* dynamic sampling (DAPO's refill of all-equal groups) is not implemented yet.
"""
from __future__ import annotations

import time

import torch

from rlx.algorithms._rl import aggregate, aggregation_weight, clipped_policy_loss, group_advantages, kl_penalty
from rlx.data.collate import prompt_batch
from rlx.errors import RlxError
from rlx.rollout import sample, sequence_logprobs

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
SCALES = ("group", "batch", "none")


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
    ):
        if loss_agg not in AGGREGATIONS:
            raise RlxError(f"unknown algo.loss_agg={loss_agg!r}; valid: {', '.join(AGGREGATIONS)}")
        if scale not in SCALES:
            raise RlxError(f"unknown algo.scale={scale!r}; valid: {', '.join(SCALES)}")
        if group_size < 2:
            raise RlxError("algo.group_size must be >= 2: advantages are relative to the group")
        if kl_coef > 0 and reference is None:
            raise RlxError("algo.kl_coef > 0 needs a reference model: add algo.reference='${model}'")
        self.reward, self.group_size, self.max_new_tokens = reward, group_size, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.eps_low, self.eps_high, self.scale, self.loss_agg = eps_low, eps_high, scale, loss_agg
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.reference = reference.model.eval().requires_grad_(False) if reference is not None else None

    # ------------------------------------------------------------------ rollouts

    @torch.no_grad()
    def make_batch(self, examples: list[dict], state) -> dict:
        model, tok = state.model, state.tokenizer
        t0 = time.perf_counter()
        grouped = [ex for ex in examples for _ in range(self.group_size)]
        prompts = prompt_batch([ex["prompt"] for ex in grouped], tok, model.device)
        rollout = sample(model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=self.max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         temperature=self.temperature, top_p=self.top_p)
        rollout_s = time.perf_counter() - t0
        responses = tok.batch_decode(rollout.response_ids, skip_special_tokens=True)  # pad after EOS
        rewards, reward_metrics = self.reward(responses, grouped, state.task)
        advantages = group_advantages(rewards, self.group_size, scale=self.scale).to(model.device)
        input_ids, attention_mask = rollout.sequences()
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": rollout.response_mask.float(),
            "advantages": advantages,
        }
        if self.reference is not None:
            batch["ref_logprobs"] = self._logprobs(self.reference, batch)
        lengths = rollout.response_mask.sum(-1).float()
        batch["num_targets"] = int(aggregation_weight(batch["response_mask"], self.loss_agg, self.max_new_tokens))
        batch["num_tokens"] = int(lengths.sum())  # generated tokens trained on
        batch["metrics"] = {
            **reward_metrics,
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item(),
            "rl/response_len": lengths.mean().item(),
            "rl/response_len_p90": lengths.quantile(0.9).item(),
            "rl/response_len_max": lengths.max().item(),
            "rl/truncated": (~rollout.finished).float().mean().item(),
            "rl/rollout_s": rollout_s,
            "rl/rollout_tokens_per_s": lengths.sum().item() / rollout_s,
        }
        return batch

    def _logprobs(self, model, batch: dict) -> torch.Tensor:
        return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"].shape[1],
                                 temperature=self.temperature)

    # ------------------------------------------------------------------ loss

    def loss(self, batch: dict, state):
        mask = batch["response_mask"]
        logprobs = self._logprobs(state.model, batch)
        per_token, clipped = clipped_policy_loss(logprobs, logprobs.detach(), batch["advantages"], mask,
                                                 self.eps_low, self.eps_high)
        metrics = dict(batch["metrics"])
        if self.reference is not None:
            kl = kl_penalty(logprobs, batch["ref_logprobs"], self.kl_estimator)
            per_token = per_token + self.kl_coef * kl
            metrics["rl/kl"] = ((kl * mask).sum() / mask.sum()).item()
        loss = aggregate(per_token, mask, self.loss_agg, self.max_new_tokens)
        metrics["rl/clip_frac"] = ((clipped.float() * mask).sum() / mask.sum()).item()
        metrics["train/loss"] = loss.detach()
        return loss, metrics
