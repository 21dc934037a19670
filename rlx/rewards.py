"""Rewards for RL: plain callables composed by config (the `reward` group).

A reward term is called as `term(responses, examples, task, lengths) -> Tensor[B]` (one float
per response; `lengths` is each response's token count, EOS included); `WeightedSum` adds
weighted terms and reports each one under `reward/<name>`. The naive length penalty and learned
reward models are terms of that shape; the length-aware methods that need a whole group or
batch (DLER's truncation, GRPO-lambda's switch, DRPO's weights, DOT's cut) shape their rewards
or advantages in their algorithm module instead.
"""
from __future__ import annotations

import torch

from rlx.data.reasoning import extract_answer


class Correctness:
    """1.0 when the task's exact checker accepts the response's final answer, else 0.0."""

    def __call__(self, responses: list[str], examples: list[dict], task, lengths=None) -> torch.Tensor:
        return torch.tensor([task.score(r, ex) for r, ex in zip(responses, examples, strict=True)])


class Format:
    """1.0 when the response ends in a parseable final-answer line (`#### <answer>`), else 0.0:
    rewards the output format independently of correctness."""

    def __call__(self, responses: list[str], examples: list[dict], task, lengths=None) -> torch.Tensor:
        ok = [r.rstrip().rsplit("\n", 1)[-1].startswith("####") and extract_answer(r) is not None for r in responses]
        return torch.tensor(ok, dtype=torch.float32)


class LengthPenalty:
    """-|o| / max_len: the naive additive length penalty (weight it in a `WeightedSum`).

    Added to correctness with weight c, a response scores correct - c |o| / max_len whether it is
    right or wrong. This is the baseline the efficient-reasoning papers beat: after GRPO's group
    centring a correct but long response can score below its group's mean when wrong answers are
    short, so the penalty can push against correct reasoning (DRPO's argument), and it shortens
    answers on prompts the model cannot yet solve (GRPO-lambda's). `max_len` is the generation
    budget, so the term lies in [-1, 0].
    """

    def __init__(self, max_len: int):
        if max_len < 1:
            from rlx.errors import RlxError

            raise RlxError(f"length penalty max_len={max_len} must be >= 1 (the generation budget)")
        self.max_len = max_len

    def __call__(self, responses: list[str], examples: list[dict], task, lengths=None) -> torch.Tensor:
        if lengths is None:
            raise ValueError("LengthPenalty needs the responses' token lengths")
        return -torch.as_tensor(lengths, dtype=torch.float32).cpu() / self.max_len


class WeightedSum:
    """sum_k weight_k * term_k(responses); `metrics` holds each term's batch mean."""

    def __init__(self, terms: dict, weights: dict[str, float]):
        if set(terms) != set(weights):
            from rlx.errors import RlxError

            raise RlxError(f"reward terms {sorted(terms)} and weights {sorted(weights)} must name the same terms")
        self.terms, self.weights = terms, weights

    def __call__(self, responses: list[str], examples: list[dict], task,
                 lengths=None) -> tuple[torch.Tensor, dict[str, float]]:
        return self.combine(self.term_values(responses, examples, task, lengths), len(responses))

    def term_values(self, responses: list[str], examples: list[dict], task, lengths=None) -> dict[str, torch.Tensor]:
        """Each term's [B] values (for methods that weigh the terms themselves: algo=constrained)."""
        return {name: term(responses, examples, task, lengths).float().cpu() for name, term in self.terms.items()}

    def combine(self, values: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted sum of the terms' [n] values, and each term's batch mean as a metric."""
        total = sum((self.weights[name] * v for name, v in values.items()), torch.zeros(n))
        metrics = {f"reward/{name}": v.mean().item() for name, v in values.items()}
        return total, metrics


class RewardModel:
    """A learned reward: a causal LM trained with `algo=rm` (see `rlx.algorithms.rm`) scores
    `prompt + response + EOS` as the logit of EOS at the last position. `checkpoint` is a
    checkpoint folder, a `checkpoints/` folder or a run folder; it is loaded once, frozen, in
    float32, and scored `batch_size` sequences at a time without gradients."""

    def __init__(self, checkpoint: str, batch_size: int = 64, max_length: int = 256, device: str = "auto"):
        from rlx.models import hf
        from rlx.state import find_checkpoint

        policy = hf(str(find_checkpoint(checkpoint)), device=device, dtype="float32")
        self.model, self.tokenizer = policy.model.eval().requires_grad_(False), policy.tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def __call__(self, responses: list[str], examples: list[dict], task, lengths=None) -> torch.Tensor:
        from rlx.algorithms.rm import sequence_reward
        from rlx.data.collate import lm_batch

        rows = [{"prompt": ex["prompt"], "completion": r} for r, ex in zip(responses, examples, strict=True)]
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(rows), self.batch_size):
            batch = lm_batch(rows[i:i + self.batch_size], self.tokenizer, self.max_length)
            out.append(sequence_reward(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                       self.tokenizer.eos_token_id).cpu())
        return torch.cat(out) if out else torch.zeros(0)
