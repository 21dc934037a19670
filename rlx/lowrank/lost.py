"""LOST: low-rank plus channel-sparse linear layers, initialised from the SVD of each layer's weight.

Li et al., "LOST: Low-rank and Sparse Pre-training for Large Language Models", arXiv 2508.02668.

    rlx train model.parameterization=lost
    rlx train 'model.parameterization={name:lost,rank:0.25,sparsity:0.05,gamma:0.5}'
    rlx train 'model.parameterization={name:lost,init:random,channel_score:random}'   # the random-init control

At build time every attention/MLP linear layer W (m×n, y = W x) is replaced by a `LostLinear`:

    W = U Σ Vᵀ                                 the SVD of the layer's initial weight
    B = U_r Σ_r^½,  A = Σ_r^½ V_rᵀ              the top-r triplets: W_r = B A (`lowrank_b`, `lowrank_a`)
    W_comp = U_{>r} Σ_{>r} V_{>r}ᵀ = W − W_r    the complement: the remaining singular values
    I = the k = round(sparsity·n) input channels (columns) of W_comp with the largest L2 norm
    W_s = W_comp[:, I]                          (m×k, `sparse_weight`; I is the buffer `sparse_channels`)

    y = γ · B σ(A x) + (1 − γ) · W_s x[I] + b

Both parts train; I never changes (a static channel set). The LM head and the embeddings stay dense.
Parameters per layer: r(m+n) + m·k (+ m for a bias), against m·n.

Choices, and where the paper leaves them open:
* γ weights the low-rank path and 1 − γ the sparse path, as in y above; default 0.5, an equal mix.
  The bias, when a layer has one, is added once, outside the mix.
* σ sits between the two factors, SiLU by default (`activation`). The paper puts a nonlinearity in
  the low-rank path and ablates its placement; it also means B A cannot be merged into one matrix.
  `activation=none` makes the path linear, so at full rank and sparsity 0 the layer is exactly γ·W x.
* Σ_r is split evenly between the factors (Σ^½ each).
* `rank` is an int (clipped to min(m, n) per layer) or a float fraction of min(m, n) (1.0 = full);
  default 0.25, the r = d/4 of low-rank pre-training at the paper's model sizes. `sparsity` is the
  fraction of input channels kept; default 0.05.
* `channel_score`: l2 (the paper), l1 (its ablation) or random (a uniform draw of k channels).
* `init=random` keeps the channel set and draws A, B, W_s at random instead: entries normal with the
  scale of W's entries for W_s, and of std(W)^½ / r^¼ for A and B (so that B A has W's entry variance).
  This is the control for "the gain comes from the SVD initialisation".
* Random draws use a generator seeded with `seed`, so building the model does not move the run's RNG.

Checkpoints hold `lowrank_a`, `lowrank_b`, `sparse_weight` and `sparse_channels` under each projection's
name. The architecture differs from the stock model, so a LOST checkpoint reloads only through rlx
(resume, or a model built with the same `model.parameterization`), not with plain transformers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rlx.errors import RlxError
from rlx.layers import TARGETS, out_in, target_layers

ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "none": None}
INITS = ("svd", "random")
CHANNEL_SCORES = ("l2", "l1", "random")


# ---------------------------------------------------------------------------- pure pieces


def resolve_rank(rank: int | float, m: int, n: int) -> int:
    """An int rank (clipped to min(m, n)) or a float fraction of min(m, n)."""
    full = min(m, n)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise RlxError(f"LOST rank={rank!r}: give an int rank or a fraction of min(m, n) in [0, 1]")
    if isinstance(rank, int):
        if rank < 0:
            raise RlxError(f"LOST rank={rank} is negative")
        return min(rank, full)
    if not 0.0 <= rank <= 1.0:
        raise RlxError(f"LOST rank={rank}: a float rank is a fraction of min(m, n) and must lie in [0, 1]")
    return round(rank * full)


def channel_count(sparsity: float, n: int) -> int:
    """k = round(sparsity · n) input channels kept in the sparse part."""
    return round(sparsity * n)


def svd_split(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_comp): A = Σ_r^½ V_rᵀ (r×n), B = U_r Σ_r^½ (m×r), W_comp = W − B A, all in float32."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    root = S[:rank].sqrt()
    a = root[:, None] * Vh[:rank]
    b = U[:, :rank] * root
    complement = (U[:, rank:] * S[rank:]) @ Vh[rank:]  # from the tail triplets: no cancellation in W − B A
    return a, b, complement


def select_channels(W_comp: torch.Tensor, k: int, score: str = "l2",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The k columns (input channels) of W_comp with the largest score, in ascending order."""
    n = W_comp.shape[1]
    if score == "random":
        chosen = torch.randperm(n, generator=generator)[:k]
    elif score in ("l2", "l1"):
        norms = W_comp.float().norm(p=2 if score == "l2" else 1, dim=0).cpu()
        chosen = torch.topk(norms, k).indices
    else:
        raise RlxError(f"unknown LOST channel_score={score!r}; valid: {', '.join(CHANNEL_SCORES)}")
    return chosen.sort().values.to(W_comp.device)


def random_like_factors(W: torch.Tensor, rank: int, k: int, generator: torch.Generator):
    """(A, B, W_s) drawn at random with W's entry scale: std(W_s) = std(W), Var((B A)_ij) = Var(W_ij)."""
    m, n = W.shape
    std = W.float().std().item()
    s = math.sqrt(std / math.sqrt(rank)) if rank else 0.0

    def draw(*shape, scale):
        return (torch.randn(*shape, generator=generator) * scale).to(W.device)

    return draw(rank, n, scale=s), draw(m, rank, scale=s), draw(m, k, scale=std)


# ---------------------------------------------------------------------------- the layer


class LostLinear(nn.Module):
    """y = γ · B σ(A x) + (1 − γ) · W_s x[I] + b. An empty part (rank 0, or k 0) is left out."""

    def __init__(self, lowrank_a: torch.Tensor, lowrank_b: torch.Tensor, sparse_weight: torch.Tensor,
                 sparse_channels: torch.Tensor, bias: torch.Tensor | None, gamma: float, activation: str = "silu"):
        super().__init__()
        self.in_features, self.out_features = lowrank_a.shape[1], lowrank_b.shape[0]
        self.rank, self.k = lowrank_a.shape[0], sparse_channels.numel()
        self.gamma, self.activation = float(gamma), activation
        # zero-size tensors are not registered: checkpoints would see them as shared storage
        for name, t in (("lowrank_a", lowrank_a), ("lowrank_b", lowrank_b), ("sparse_weight", sparse_weight)):
            self.register_parameter(name, nn.Parameter(t) if t.numel() else None)
        self.register_buffer("sparse_channels", sparse_channels if self.k else None)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(*x.shape[:-1], self.out_features)
        if self.lowrank_a is not None:
            h = F.linear(x, self.lowrank_a)
            act = ACTIVATIONS[self.activation]
            y = y + self.gamma * F.linear(act(h) if act else h, self.lowrank_b)
        if self.sparse_weight is not None:
            y = y + (1 - self.gamma) * F.linear(x.index_select(-1, self.sparse_channels), self.sparse_weight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"channels={self.k}, gamma={self.gamma}, activation={self.activation}")


def lost_layer(W: torch.Tensor, bias: torch.Tensor | None, rank: int, k: int, gamma: float,
               activation: str = "silu", init: str = "svd", channel_score: str = "l2",
               generator: torch.Generator | None = None) -> LostLinear:
    """A `LostLinear` from an (m×n) weight; its tensors keep W's dtype and device."""
    a, b, complement = svd_split(W, rank)
    channels = select_channels(complement, k, channel_score, generator)
    sparse = complement[:, channels]
    if init == "random":
        a, b, sparse = random_like_factors(W, rank, k, generator if generator is not None else torch.Generator())

    def cast(t):
        return t.to(dtype=W.dtype, device=W.device).contiguous()

    return LostLinear(cast(a), cast(b), cast(sparse), channels, None if bias is None else bias.detach().clone(),
                      gamma, activation)


# ---------------------------------------------------------------------------- the surgery


def _check(rank, sparsity, gamma, activation, init, channel_score) -> None:
    resolve_rank(rank, 1, 1)  # type and range
    for name, value in (("sparsity", sparsity), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise RlxError(f"LOST {name}={value!r} must be a number in [0, 1]")
    for name, value, valid in (("activation", activation, ACTIVATIONS), ("init", init, INITS),
                               ("channel_score", channel_score, CHANNEL_SCORES)):
        if value not in valid:
            raise RlxError(f"unknown LOST {name}={value!r}; valid: {', '.join(valid)}")


@torch.no_grad()
def apply_lost(model: nn.Module, rank: int | float = 0.25, sparsity: float = 0.05, gamma: float = 0.5,
               activation: str = "silu", init: str = "svd", channel_score: str = "l2",
               targets: str | None = TARGETS, seed: int = 0) -> dict[str, LostLinear]:
    """Replace every attention/MLP linear layer of `model` by a `LostLinear`, in place.
    Returns the new layers by name. See the module docstring for the options."""
    _check(rank, sparsity, gamma, activation, init, channel_score)
    targets = TARGETS if targets is None else targets
    if hasattr(model, "peft_config"):
        raise RlxError("LOST replaces the linear layers LoRA adapts: use model.parameterization or model.lora, not both")
    layers = target_layers(model, targets)
    if not layers:
        raise RlxError(f"LOST found no attention/MLP linear layers matching {targets!r}")
    generator = torch.Generator().manual_seed(seed)
    new = {}
    for name, module in layers.items():
        W = out_in(module).detach()
        m, n = W.shape
        new[name] = lost_layer(W, module.bias, resolve_rank(rank, m, n), channel_count(sparsity, n), gamma,
                               activation, init, channel_score, generator)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new[name])
    return new
