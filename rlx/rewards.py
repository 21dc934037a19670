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


# ---------------------------------------------------------------------------- Ctrl-U


def uncertainty_weighted(views: torch.Tensor, scale: float = 1.0, temperature: float = 1.0,
                         kind: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """(r_hat, U) from K >= 2 reward views [K, B]: r_hat = exp(-U / temperature) * mean_k r_k.
    gaussian:  U = var_k(r) / scale^2 (unbiased; for two views (r1 - r2)^2 / (2 scale^2));
    bernoulli: U = KL(Bern(sigmoid(r2)) || Bern(sigmoid(r1))) for two views of a logit-valued reward,
    Ctrl-U's per-pixel KL between the two predictions, with two classes."""
    if views.dim() != 2 or views.shape[0] < 2:
        raise ValueError(f"need [K >= 2, B] reward views, got shape {tuple(views.shape)}")
    if kind == "gaussian":
        u = views.var(dim=0) / scale**2
    elif kind == "bernoulli":
        if views.shape[0] != 2:
            raise ValueError("kind='bernoulli' compares exactly two views")
        p1, p2 = torch.sigmoid(views[0]), torch.sigmoid(views[1])
        u = scale * (p2 * (p2 / p1).log() + (1 - p2) * ((1 - p2) / (1 - p1)).log())
    else:
        raise ValueError(f"kind must be 'gaussian' or 'bernoulli', not {kind!r}")
    return torch.exp(-u / temperature) * views.mean(dim=0), u


class UncertainRewardModel:
    """Ctrl-U's uncertainty weighting (Zhang et al., ICLR 2025, arXiv 2410.11236), transferred from
    its image setting to LLM reward models (the transfer is rlx's, not the paper's): two or more
    reward models trained apart (`algo=rm` with different seeds or data: an ensemble) score each
    response; where they disagree the reward is down-weighted, r_hat = exp(-U / temperature) *
    mean(views), U their disagreement (`uncertainty_weighted`). In the paper the trained model
    produces both views and U is also a loss term; here the reward models are frozen, so U has no
    gradient with respect to the policy and only the weighting transfers. `kind=bernoulli` treats
    the rewards as logits (a Bradley-Terry reward is one) and takes the KL between the two views'
    Bernoullis, as Ctrl-U takes the KL between two segmentation predictions."""

    def __init__(self, checkpoints: list[str], scale: float = 1.0, temperature: float = 1.0, kind: str = "gaussian",
                 batch_size: int = 64, max_length: int = 256, device: str = "auto"):
        from rlx.errors import RlxError

        if len(checkpoints) < 2:
            raise RlxError("reward uncertainty needs two or more reward-model checkpoints (an ensemble): "
                           f"reward.terms.rm.checkpoints=[A,B], got {len(checkpoints)}")
        if kind not in ("gaussian", "bernoulli") or scale <= 0 or temperature <= 0:
            raise RlxError(f"kind={kind!r} must be gaussian or bernoulli, scale and temperature > 0")
        self.models = [RewardModel(c, batch_size, max_length, device) for c in checkpoints]
        self.scale, self.temperature, self.kind = scale, temperature, kind

    def __call__(self, responses: list[str], examples: list[dict], task, lengths=None) -> torch.Tensor:
        views = torch.stack([m(responses, examples, task, lengths) for m in self.models])
        return uncertainty_weighted(views, self.scale, self.temperature, self.kind)[0]
