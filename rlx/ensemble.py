"""Ensembles of K checkpoints that average logits, and the scaling-law fits that read an asymptote off them.

    from rlx.ensemble import Ensemble, fit_power_law
    ensemble = Ensemble.load(["outputs/a", "outputs/b", "outputs/c"])   # run folders or checkpoints
    rlx.evaluate.perplexity(ensemble, ensemble.tokenizer, task.split("validation"), 16, 256)
    texts = ensemble.sample(prompt_ids, max_new_tokens=128, generator=g)  # sampling from the averaged logits
    fit_power_law([1, 2, 3], losses)                                     # {"A": .., "alpha": .., "E": ..}

The recipe these serve, the data-constrained one of the conf/experiment/infinite_compute_*.yaml files,
is from "Pre-training under Infinite Compute" (Konwoo Kim, Suhas Kotha, Percy Liang, Tatsunori
Hashimoto; arXiv 2509.14786, ICLR 2026):

* An ensemble of K models trained independently (other seeds: init and data order) predicts with
  the mean of its members' logits, z = (1/K) sum_k z_k, and p = softmax(z): the paper averages logits,
  not probabilities (the distribution is the normalised geometric mean of the members'). Members
  with logits [0, 2] and [2, 0] give [1, 1]; with [0, 4] and [0, 0] the mean [0, 2] puts 0.881 on the
  second token, where averaging probabilities would put (0.982 + 0.5) / 2 = 0.741. K copies of a model
  are that model.
* Recipes are compared by the asymptote of their scaling law, not at a fixed compute: the loss of
  the regularized single model in parameters, L(N) = A / N^alpha + E (at 200M tokens the paper
  fits 0.05 / N^1.02 + 3.43, N in billions), and of the ensemble in members, L(K) = A / K^beta + E
  (the excess loss falls about as 1/K; asymptote 3.34 for K -> inf at N = 300M). `fit_power_law`
  fits either with scipy.optimize.curve_fit (scipy is a dependency of the .venv here) and returns E.

`Ensemble.forward` has the call signature of a causal LM (`input_ids`, `attention_mask` -> an object
with `.logits`), so rlx.evaluate.perplexity scores an ensemble as it scores one model. Generation
does not go through transformers' `generate` (an ensemble is no PreTrainedModel): `sample` runs the
members side by side, each with its own KV cache, and draws from softmax(mean logits / T).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor

from rlx.errors import RlxError


def average_logits(logits: list[Tensor]) -> Tensor:
    """The members' logits averaged element-wise (the paper's ensemble prediction, before softmax).
    Written as z_1 + mean_k (z_k - z_1), equal to the mean, so that K identical members give z_1
    bit for bit ((z + z + z) / 3 need not round back to z)."""
    first = logits[0]
    return first + (torch.stack(logits) - first).mean(0)


class Ensemble(torch.nn.Module):
    """K causal LMs over one vocabulary whose prediction is the mean of their logits."""

    def __init__(self, members: list[torch.nn.Module], tokenizer=None):
        super().__init__()
        if not members:
            raise RlxError("an ensemble needs at least one member")
        vocab = {m.config.vocab_size for m in members if hasattr(m, "config")}
        if len(vocab) > 1:
            raise RlxError(f"ensemble members disagree on the vocabulary size ({sorted(vocab)}): logits cannot be averaged")
        self.members = torch.nn.ModuleList(members)
        self.tokenizer = tokenizer
        self.requires_grad_(False).eval()

    @classmethod
    def load(cls, paths: list[str], device: str = "auto", dtype: str = "float32") -> Ensemble:
        """Members from run folders or checkpoint folders (rlx.state.find_checkpoint); a missing one is one line."""
        from rlx.models import hf
        from rlx.state import find_checkpoint

        policies = [hf(str(find_checkpoint(p)), device=device, dtype=dtype) for p in paths]
        return cls([p.model for p in policies], policies[0].tokenizer if policies else None)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> SimpleNamespace:
        out = [m(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.float() for m in self.members]
        return SimpleNamespace(logits=average_logits(out))

    @torch.no_grad()
    def sample(self, prompt_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Prompt + `max_new_tokens` tokens per row, drawn from softmax(mean logits / T) (T = 0: greedy).
        Rows of `prompt_ids` must have equal length (no padding): unconditional sampling starts each
        row from one token. No EOS stop: the corpus text has none."""
        from transformers import DynamicCache

        caches = [DynamicCache() for _ in self.members]
        ids, step_in = prompt_ids, prompt_ids
        for _ in range(max_new_tokens):
            logits = [m(input_ids=step_in, cache=c, use_cache=True).logits[:, -1].float()
                      for m, c in zip(self.members, caches)]
            z = average_logits(logits)
            if temperature == 0:
                nxt = z.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(z / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            ids, step_in = torch.cat([ids, nxt], 1), nxt
        return ids


# ---------------------------------------------------------------------------- scaling-law fits


def power_law(x, A, alpha, E):
    """A / x^alpha + E: the paper's law in parameters N (alpha) or in ensemble members K (beta)."""
    return A / x**alpha + E


def fit_power_law(x: list[float], y: list[float]) -> dict:
    """Least-squares A, alpha, E of y = A / x^alpha + E (scipy.optimize.curve_fit, A, alpha >= 0 and E
    below the smallest loss). Three points determine the curve; fewer are one clear error."""
    from scipy.optimize import curve_fit

    if len(x) != len(y) or len(x) < 3:
        raise RlxError(f"a power law A/x^alpha + E has 3 parameters: fit it to at least 3 points (got {len(x)})")
    x_, y_ = [float(v) for v in x], [float(v) for v in y]
    lo, hi = min(y_), max(y_)
    # Start from alpha 1 (the paper's N-law has 1.02, its K-law about 1), E just below the best
    # loss, and A matching the first point; the bounds keep the curve decreasing and E under the data.
    e0 = lo - 0.1 * max(hi - lo, 1e-6)
    p0 = [max((y_[0] - e0) * x_[0], 1e-12), 1.0, e0]
    bounds = ([0.0, 0.0, -math.inf], [math.inf, 10.0, lo])
    (A, alpha, E), _ = curve_fit(power_law, x_, y_, p0=p0, bounds=bounds, maxfev=20000, xtol=1e-15, ftol=1e-15,
                                 gtol=1e-15)
    return {"A": float(A), "alpha": float(alpha), "E": float(E)}
