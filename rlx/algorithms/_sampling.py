"""What every online RL algorithm does before its loss: sample responses to the prompts, score
them with the `reward` config group, and report the same rollout metrics under the same names
(GRPO, PPO and their variants all call `sample_and_score`).

Rollout metrics (per micro-batch, averaged over the steps of a logging window):

    reward/mean, reward/std, reward/<term>   the configured reward and each of its terms
    rl/accuracy                              fraction the task's checker accepts, whatever the reward
    rl/response_len, _p90, _max              response tokens (EOS included)
    rl/truncated                             fraction cut off by max_new_tokens
    rl/rollout_s, rl/rollout_tokens_per_s    sampling time and speed (the loop's time/batch_s adds
                                             scoring and reference passes)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from rlx.data.collate import prompt_batch
from rlx.rollout import Rollout, sample


@dataclass
class Scored:
    examples: list[dict]  # one per row: each prompt repeated `n` times, groups contiguous
    rollout: Rollout
    rewards: Tensor  # [B] float32, on the CPU
    correct: Tensor  # [B] float32 0/1 on the CPU: the task's checker, whatever the reward
    metrics: dict[str, float]

    def select(self, rows: Tensor) -> Scored:
        """The given rows, in that order (the metrics stay those of the whole rollout)."""
        return Scored([self.examples[r] for r in rows], self.rollout.select(rows.to(self.rollout.prompt_ids.device)),
                      self.rewards[rows], self.correct[rows], self.metrics)

    @staticmethod
    def concat(draws: list[Scored], pad_token_id: int) -> Scored:
        """All rows of several draws, in order; the rollout metrics are a copy of the first draw's."""
        return Scored([ex for d in draws for ex in d.examples],
                      Rollout.concat([d.rollout for d in draws], pad_token_id),
                      torch.cat([d.rewards for d in draws]), torch.cat([d.correct for d in draws]),
                      dict(draws[0].metrics))


def score(rollout: Rollout, rows: list[dict], state, reward) -> tuple[Tensor, Tensor, dict[str, float]]:
    """(rewards [B], checker correctness [B], the rollout metrics but timing) of finished or cut
    responses: decoded, scored by `reward`, checked by the task."""
    responses = state.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)  # pad after EOS
    lengths = rollout.response_mask.sum(-1).float().cpu()
    rewards, reward_metrics = reward(responses, rows, state.task, lengths)
    rewards = rewards.float().cpu()
    correct = torch.tensor([state.task.score(r, ex) for r, ex in zip(responses, rows, strict=True)])
    metrics = {
        **reward_metrics,
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "rl/accuracy": correct.mean().item(),
        "rl/response_len": lengths.mean().item(),
        "rl/response_len_p90": lengths.quantile(0.9).item(),
        "rl/response_len_max": lengths.max().item(),
        "rl/truncated": (~rollout.finished).float().mean().item(),
    }
    return rewards, correct, metrics


def sample_and_score(examples, state, reward, *, n: int, max_new_tokens: int, temperature: float,
                     top_p: float, engine=None) -> Scored:
    """Sample `n` responses to each example's prompt and score them. `engine` (`rlx.engines`)
    samples them; None is rlx's own sampler on the training model."""
    model, tok = state.model, state.tokenizer
    rows = [ex for ex in examples for _ in range(n)]
    t0 = time.perf_counter()
    prompts = prompt_batch([ex["prompt"] for ex in rows], tok, model.device)
    generate = sample if engine is None else engine.generate
    rollout = generate(model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=max_new_tokens,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     temperature=temperature, top_p=top_p)
    rollout_s = time.perf_counter() - t0
    rewards, correct, metrics = score(rollout, rows, state, reward)
    metrics["rl/rollout_s"] = rollout_s
    metrics["rl/rollout_tokens_per_s"] = rollout.response_mask.sum().item() / rollout_s
    return Scored(rows, rollout, rewards, correct, metrics)
