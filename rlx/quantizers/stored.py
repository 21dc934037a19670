"""Linear layers whose weights live as low-precision codes, and the module swap that installs them.

`StoredLinear` keeps the original `nn.Parameter` object (so the optimizer built before the swap
still owns it), but between optimizer steps that parameter holds a one-element placeholder and
the weight exists only as codes plus scales (rlx/quantizers/formats.py). The forward decodes the
weight (a transient fp32 tensor, freed with the step's activations) and hands its gradient to the
placeholder, so `p.grad` is the gradient at the quantized weights. Around the optimizer step the
quantizer hook materializes `p.data` in fp32, lets the base optimizer update it, and encodes it
again. `state_dict()` reports the decoded weight, so checkpoints stay ordinary transformers
checkpoints.

`FakeQuantLinear` is the master-weight baseline: an fp32 weight, a forward on its quantized
value and a straight-through gradient.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlx.quantizers.formats import Quantized


class _Decoded(torch.autograd.Function):
    """The stored weight, decoded; its gradient goes to the placeholder parameter unchanged."""

    @staticmethod
    def forward(ctx, placeholder: Tensor, layer: StoredLinear) -> Tensor:
        return layer.fmt.decode(layer.q)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, quantize: Callable[[Tensor], Tensor]) -> Tensor:
        return quantize(w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def placeholder_like(p: Tensor) -> Tensor:
    """A tensor of `p`'s shape backed by a single element: what a stored parameter holds."""
    return torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)


class StoredLinear(nn.Module):
    def __init__(self, linear: nn.Linear, fmt):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.fmt = fmt
        self.q: Quantized | None = None
        self.register_state_dict_post_hook(_decoded_weight_in_state_dict)

    def store(self, q: Quantized) -> None:
        """Hold `q` as the weight and release the fp32 values."""
        self.q = q
        self.weight.data = placeholder_like(self.weight)

    def materialize(self) -> Tensor:
        """Put the decoded weight back in fp32 (for the optimizer step); returns it."""
        self.weight.data = self.fmt.decode(self.q)
        self.q = None
        return self.weight.data

    def held_tensors(self) -> Iterator[Tensor]:
        if self.q is not None:
            yield from (self.q.codes, self.q.scales)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.q is None else _Decoded.apply(self.weight, self)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"


def _decoded_weight_in_state_dict(module: StoredLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    if module.q is not None:
        state_dict[prefix + "weight"] = module.fmt.decode(module.q)


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, quantize: Callable[[Tensor], Tensor]):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.quantize = quantize

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _StraightThrough.apply(self.weight, self.quantize), self.bias)


def swap_modules(model: nn.Module, layers: list[tuple[str, nn.Module]], make: Callable[[nn.Module], nn.Module]) -> dict:
    """Replace each named layer by `make(layer)`; returns {name: new module}."""
    swapped = {}
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        swapped[name] = make(layer)
        setattr(parent, child, swapped[name])
    return swapped
