"""LSQ fake quantization with elastic steps: the layer EQ-Net trains (`quantizer=eqnet`, rlx/quantizers/eqnet.py),
its space of configurations, and choosing and evaluating a point of it.

Quantizer: LSQ (Esser et al., 2020), q = round(clamp(x/s [+ z], qmin, qmax)), x̂ = (q [- z])·s,
rounding straight-through, the step s learned with LSQ's gradient scale 1/sqrt(n·qmax) (n: the
elements sharing s) and initialized to 2·mean|x|/sqrt(qmax). Symmetric codes are signed,
[-2^(b-1), 2^(b-1) - 1]; asymmetric codes are [0, 2^b - 1] with a learned zero point z (LSQ+'s
offset, rounded straight-through so it is an integer code), initialized from the range
[min(x, 0), max(x, 0)]. Steps are shared by all subnets but kept per (bits, granularity, symmetry)
key, as the paper does, in an `ElasticQuantLinear` that wraps the layer's original Parameters.
Activation steps are per tensor, keyed by (bits, symmetry), initialized from the first input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlx.errors import RlxError

EPS = 1e-8  # the smallest step: a zero row or tensor keeps a usable grid
GRANULARITIES = {"channel": True, "tensor": False}


@dataclass(frozen=True)
class QConfig:
    """One layer's point of the space: weight bits, one step per output row or per tensor,
    symmetric or asymmetric codes (weights and input), input bits (None: full-precision input)."""

    bits: int = 8
    per_channel: bool = True
    symmetric: bool = False
    act_bits: int | None = None


# ---------------------------------------------------------------------------- LSQ


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax): signed codes for symmetric, unsigned (shifted by a zero point) for asymmetric."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _round_ste(x: Tensor) -> Tensor:
    return x + (x.round() - x).detach()


def _grad_scale(x: Tensor, g: float) -> Tensor:
    """x in value, g·dL/dx in gradient: LSQ's balance of step and weight updates."""
    return x * g + (x - x * g).detach()


def lsq(x: Tensor, step: Tensor, zero: Tensor | None, bits: int, symmetric: bool, n: int) -> Tensor:
    """LSQ fake quantization of `x` with learned `step` (and integer `zero` point when asymmetric);
    `n` is the number of elements that share one step (LSQ's gradient scale 1/sqrt(n·qmax))."""
    qmin, qmax = code_range(bits, symmetric)
    g = 1.0 / math.sqrt(n * qmax)
    s = _grad_scale(step, g).clamp_min(EPS)
    z = 0.0 if zero is None else _round_ste(_grad_scale(zero, g))
    q = _round_ste(torch.clamp(x / s + z, qmin, qmax))  # clip, then round: LSQ's gradients at the edges
    return (q - z) * s


def lsq_init(rows: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Per row of `rows`: LSQ's initial step 2·mean|x|/sqrt(qmax) (symmetric), or the range
    [min(x, 0), max(x, 0)] spread over the 2^b codes with zero at code z (asymmetric)."""
    _, qmax = code_range(bits, symmetric)
    if symmetric:
        return (2 * rows.abs().mean(1) / math.sqrt(qmax)).clamp_min(EPS), None
    low, high = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
    step = ((high - low) / qmax).clamp_min(EPS)
    return step, -low / step


# ---------------------------------------------------------------------------- WDR and KD


# ---------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class Space:
    bits: tuple[int, ...]
    act_bits: tuple[int | None, ...]  # (None,): activations in full precision
    per_channel: tuple[bool, ...]
    symmetric: tuple[bool, ...]

    def largest(self) -> QConfig:
        return QConfig(max(self.bits), True in self.per_channel, False not in self.symmetric, self.act_bits[-1])

    def smallest(self, choose: Callable) -> QConfig:
        return QConfig(min(self.bits), choose(self.per_channel), choose(self.symmetric), self.act_bits[0])

    def random(self, choose: Callable) -> QConfig:
        return QConfig(choose(self.bits), choose(self.per_channel), choose(self.symmetric), choose(self.act_bits))


def _bit_range(name: str, value) -> tuple[int, ...]:
    lo_hi = list(value) if not isinstance(value, int) else [value, value]
    if len(lo_hi) != 2 or not all(isinstance(b, int) for b in lo_hi) or not 2 <= lo_hi[0] <= lo_hi[1] <= 8:
        raise RlxError(f"quantizer.{name}={value} must be [lo, hi] with 2 <= lo <= hi <= 8")
    return tuple(range(lo_hi[0], lo_hi[1] + 1))


def _options(value) -> list:
    return [value] if isinstance(value, (str, bool)) else list(value)


def make_space(weight_bits, act_bits, granularity, symmetric) -> Space:
    granularity, symmetric = _options(granularity), _options(symmetric)
    if not granularity or set(granularity) - set(GRANULARITIES):
        raise RlxError(f"quantizer.granularity={granularity} must be a non-empty subset of [channel, tensor]")
    if not symmetric or any(not isinstance(s, bool) for s in symmetric):
        raise RlxError(f"quantizer.symmetric={symmetric} must be a non-empty subset of [false, true]")
    acts = (None,) if act_bits is None else _bit_range("act_bits", act_bits)
    return Space(_bit_range("weight_bits", weight_bits), acts, tuple(dict.fromkeys(GRANULARITIES[g] for g in granularity)),
                 tuple(dict.fromkeys(symmetric)))


# ---------------------------------------------------------------------------- the layer


class ElasticQuantLinear(nn.Module):
    """nn.Linear over the original Parameters (the optimizer keeps owning them), fake-quantized
    with LSQ at `self.config`. Steps and zero points live in plain dicts keyed by
    (bits, per_channel, symmetric) for the weight and (bits, symmetric) for the input, not as
    module attributes: `state_dict()` keeps the transformers keys `weight` and `bias` only, and
    the hook checkpoints the steps itself. They are created on the weight's device at the swap."""

    def __init__(self, linear: nn.Linear, space: Space):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.config = space.largest()
        self.weight_quant = {key: self._weight_init(*key) for key in product(space.bits, space.per_channel,
                                                                             space.symmetric)}
        acts = [b for b in space.act_bits if b is not None]
        self.act_quant = {(b, sym): self._act_params(sym) for b, sym in product(acts, space.symmetric)}
        self.act_ready = False  # input steps are initialized from the first input

    @torch.no_grad()
    def _weight_init(self, bits: int, per_channel: bool, symmetric: bool) -> tuple[nn.Parameter, nn.Parameter | None]:
        w = self.weight.detach().float()
        step, zero = lsq_init(w if per_channel else w.reshape(1, -1), bits, symmetric)
        return nn.Parameter(step[:, None]), None if zero is None else nn.Parameter(zero[:, None])

    def _act_params(self, symmetric: bool) -> tuple[nn.Parameter, nn.Parameter | None]:
        like = lambda: nn.Parameter(torch.ones(1, device=self.weight.device))
        return like(), None if symmetric else like()

    @torch.no_grad()
    def _act_init(self, x: Tensor) -> None:
        rows = x.detach().float().reshape(1, -1)
        for (bits, symmetric), (step, zero) in self.act_quant.items():
            s, z = lsq_init(rows, bits, symmetric)
            step.copy_(s)
            if zero is not None:
                zero.copy_(z)
        self.act_ready = True

    def set_config(self, config: QConfig) -> None:
        if (config.bits, config.per_channel, config.symmetric) not in self.weight_quant:
            raise RlxError(f"{config} is outside this layer's space (weights: {sorted(self.weight_quant)})")
        if config.act_bits is not None and (config.act_bits, config.symmetric) not in self.act_quant:
            raise RlxError(f"{config}: input bits outside this layer's space (inputs: {sorted(self.act_quant) or 'fp'})")
        self.config = config

    def quantized_weight(self) -> Tensor:
        c = self.config
        step, zero = self.weight_quant[(c.bits, c.per_channel, c.symmetric)]
        n = self.in_features if c.per_channel else self.weight.numel()
        return lsq(self.weight.float(), step, zero, c.bits, c.symmetric, n).to(self.weight.dtype)

    def quantized_input(self, x: Tensor) -> Tensor:
        c = self.config
        if not self.act_ready:
            self._act_init(x)
        step, zero = self.act_quant[(c.act_bits, c.symmetric)]
        return lsq(x.float(), step, zero, c.act_bits, c.symmetric, self.in_features).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.config.act_bits is not None:
            x = self.quantized_input(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def held_tensors(self) -> Iterator[Tensor]:
        """The steps and zero points (rlx.memory counts what modules hold outside parameters)."""
        for pair in (*self.weight_quant.values(), *self.act_quant.values()):
            yield from (t for t in pair if t is not None)

    def quant_state(self) -> dict:
        copy = lambda quant: {k: tuple(None if t is None else t.detach().clone() for t in v) for k, v in quant.items()}
        return {"weight": copy(self.weight_quant), "act": copy(self.act_quant), "act_ready": self.act_ready}

    @torch.no_grad()
    def load_quant_state(self, state: dict) -> None:
        for quant, saved in ((self.weight_quant, state["weight"]), (self.act_quant, state["act"])):
            if set(quant) != set(saved):
                raise RlxError("the checkpoint's quantizer=eqnet space differs from this run's")
            for key, pair in quant.items():
                for t, s in zip(pair, saved[key]):
                    if t is not None:
                        t.copy_(s)
        self.act_ready = state["act_ready"]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, config={self.config}"


# ---------------------------------------------------------------------------- using a trained model


def elastic_layers(model: nn.Module) -> dict[str, ElasticQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ElasticQuantLinear)}


def set_config(model: nn.Module, config: QConfig | Mapping[str, QConfig]) -> None:
    """Choose the point of the space the model runs outside training: one `QConfig` for every
    layer, or {layer name: QConfig} (mixed precision; layers not named keep theirs)."""
    layers = elastic_layers(model)
    if not layers:
        raise RlxError("the model has no EQ-Net layers: train it with quantizer=eqnet or load it with load_supernet")
    per_layer = dict(config) if isinstance(config, Mapping) else dict.fromkeys(layers, config)
    unknown = sorted(set(per_layer) - set(layers))
    if unknown:
        raise RlxError(f"no EQ-Net layer named {unknown[0]!r}; layers: {', '.join(list(layers)[:3])}, ...")
    for name, c in per_layer.items():
        layers[name].set_config(c)


def evaluate_space(model: nn.Module, configs: Mapping[str, QConfig | Mapping[str, QConfig]],
                   evaluate: Callable[[nn.Module], dict]) -> dict[str, dict]:
    """{name: evaluate(model)} at each named point of the space, all on the same trained weights;
    the model's configuration is restored afterwards."""
    resting = {name: layer.config for name, layer in elastic_layers(model).items()}
    try:
        results = {}
        for name, config in configs.items():
            set_config(model, config)
            results[name] = evaluate(model)
        return results
    finally:
        set_config(model, resting)


