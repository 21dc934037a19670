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


class PromptShift:
    """A constant c(x) per prompt, drawn from N(0, scale^2) by a hash of the prompt and `seed`: what a
    reward model trained on comparisons cannot pin down (its rewards are identified only up to such a
    shift). Added to another term it changes no preference between two responses to one prompt, which
    P3O ignores by construction and PPO's critic must learn (`make bench-multi` uses it)."""

    def __init__(self, scale: float = 1.0, seed: int = 0):
        self.scale, self.seed = scale, seed

    def __call__(self, responses: list[str], examples: list[dict], task, lengths=None) -> torch.Tensor:
        import hashlib

        def shift(prompt: str) -> float:
            digest = hashlib.sha256(f"{self.seed}:{prompt}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            return float(torch.randn(1, generator=g)) * self.scale

        return torch.tensor([shift(ex["prompt"]) for ex in examples])


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


# ---------------------------------------------------------------------------- Quark (provisional)


def tri_factor_weights(zbar: torch.Tensor, priority: torch.Tensor, redundancy: torch.Tensor, tau: float,
                       floor: float = 0.0) -> torch.Tensor:
    """w ~ softmax(-tau * zbar) * priority * redundancy (weak objectives, risky ones and unique ones
    weigh more), floored at `floor` and normalised to sum 1."""
    w = torch.softmax(-tau * zbar, 0) * priority / priority.sum() * redundancy
    w = w / w.sum()
    if floor > 0:
        w = w.clamp(min=floor)
        w = w / w.sum()
    return w


def redundancy_factors(z: torch.Tensor) -> torch.Tensor:
    """[K] 1 / (1 + sum_{j != k} max(0, corr(z_k, z_j))) from the normalised values z [K, B] (Pearson;
    a constant objective correlates with nothing)."""
    centred = z - z.mean(1, keepdim=True)
    norm = centred.norm(dim=1)
    corr = (centred @ centred.T) / (norm[:, None] * norm[None, :]).clamp(min=1e-12)
    corr = corr.clamp(min=0).fill_diagonal_(0)
    return 1 / (1 + corr.sum(1))


class ReferenceNormalized:
    """`reward=multi`: Quark Medical Alignment's two mechanisms for heterogeneous rewards (Xu et al.,
    2026, arXiv 2602.11661), in rlx's PROVISIONAL reconstruction: the paper's equations and settings
    were not available, only the mechanisms' names and goals, so every formula below is rlx's design
    (the paper note's), not a reproduction.

    Reference-frozen normalisation (RFN): each term's mean and std are taken on the responses of
    the first `calibration` rollouts, which the initial policy (the reference) samples, and then
    frozen: z_k = (r_k - mu_k) / (s_k + eps) for the rest of the run, so a term that improves shows
    as a growing z instead of being re-centred away, and no term dominates by its scale.
    Tri-factor weights: every `every` rollouts after calibration, w_new ~ softmax(-tau zbar) (weak
    terms up) * priority (risk) * 1 / (1 + sum of positive correlations) (redundant terms down),
    floored at `floor`, then w <- (1 - rho) w + rho w_new. The reward is sum_k w_k z_k. Deviation
    from the note: the weights are recomputed on the rollout itself, not a held-out batch.

    The statistics and weights are the run's state: `state_dict` (algo=grpo checkpoints them)."""

    def __init__(self, terms: dict, priority: dict | None = None, calibration: int = 1, every: int = 50,
                 tau: float = 1.0, rho: float = 0.1, floor: float = 0.05, eps: float = 1e-6, adaptive: bool = True):
        from rlx.errors import RlxError

        self.names, self.terms = list(terms), terms
        priority = priority or {}
        if set(priority) - set(terms) or any(v <= 0 for v in priority.values()):
            raise RlxError(f"reward.priority names terms of {sorted(terms)} with values > 0, got {dict(priority)}")
        if calibration < 1 or every < 1 or not 0 <= rho <= 1 or not 0 <= floor * len(terms) <= 1:
            raise RlxError("reward.calibration and reward.every must be >= 1, reward.rho in [0, 1] and "
                           "reward.floor at most 1 / the number of terms")
        self.priority = torch.tensor([float(priority.get(n, 1.0)) for n in self.names])
        self.calibration, self.every, self.tau, self.rho, self.floor, self.eps = calibration, every, tau, rho, floor, eps
        self.adaptive = adaptive
        k = len(self.names)
        self.weights = torch.full((k,), 1.0 / k)
        self.sums, self.squares, self.count = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), 0
        self.calls = 0

    @property
    def frozen_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, s) per term over the calibration responses (s the unbiased std)."""
        mean = self.sums / max(self.count, 1)
        var = (self.squares - self.count * mean.square()) / max(self.count - 1, 1)
        return mean.float(), var.clamp(min=0).sqrt().float()

    def normalise(self, values: torch.Tensor) -> torch.Tensor:
        mu, s = self.frozen_stats
        return (values - mu[:, None]) / (s[:, None] + self.eps)

    def __call__(self, responses: list[str], examples: list[dict], task, lengths=None):
        values = torch.stack([self.terms[n](responses, examples, task, lengths).float().cpu() for n in self.names])
        self.calls += 1
        if self.calls <= self.calibration:  # the reference's responses: they set the frozen statistics
            self.sums += values.double().sum(1)
            self.squares += values.double().square().sum(1)
            self.count += values.shape[1]
        z = self.normalise(values)
        if self.adaptive and self.calls > self.calibration and (self.calls - self.calibration) % self.every == 0:
            new = tri_factor_weights(z.mean(1), self.priority, redundancy_factors(z), self.tau, self.floor)
            self.weights = (1 - self.rho) * self.weights + self.rho * new
        metrics = {f"reward/{n}": values[i].mean().item() for i, n in enumerate(self.names)}
        metrics.update({f"reward/weight_{n}": self.weights[i].item() for i, n in enumerate(self.names)})
        return (self.weights[:, None] * z).sum(0), metrics

    def state_dict(self) -> dict:
        return {"weights": self.weights, "sums": self.sums, "squares": self.squares, "count": self.count,
                "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.sums, self.squares = state["weights"], state["sums"], state["squares"]
        self.count, self.calls = state["count"], state["calls"]


def reward_state(reward) -> dict:
    """A stateful reward's state (reward=multi's frozen statistics and weights), for the checkpoint
    of the algorithm that holds it."""
    return {"reward": reward.state_dict()} if hasattr(reward, "state_dict") else {}


def load_reward_state(reward, state: dict) -> None:
    if "reward" in state and hasattr(reward, "load_state_dict"):
        reward.load_state_dict(state["reward"])
