"""ECO: quantized training without full-precision master weights (Nikdan et al., 2026), and the
two baselines it is measured against.

    rlx train quantizer=eco                          # FP8 E4M3 weights, per-row scales
    rlx train quantizer=eco quantizer.format=int quantizer.bits=4 quantizer.rounding=stochastic
    rlx train quantizer=no_master                    # the same storage, residual dropped
    rlx train quantizer=master                       # fp32 master weights, quantized forward

The trainable linear layers hold only codes (rlx/quant/stored.py). Each step the base optimizer
(any torch SGD-momentum or Adam/AdamW) proposes W~ = Ŵ - η·U from the quantized Ŵ; W~ is encoded
again, and the rounding residual E = W~ - q(W~) is folded into the first moment so the next
steps re-apply it (the paper's momentum pull-back, with E_t ≈ E_{t+1}):

    SGD (torch's heavy-ball or EMA form; weight decay is in the gradient):
        M += (1/η)(1 - 1/β) E
    Adam/AdamW, whose step is η·M/(bc1·(sqrt(V/bc2) + ε)):
        M += (1 - ηλ)·(bc1/η)·(1 - 1/β1)·(sqrt(V/bc2) + ε) ⊙ E       (λ: decoupled decay only)

The (1 - ηλ) factor follows from the exact derivation (the paper's Algorithm 3 omits it; it
changes the correction by O(ηλ)). η is the learning rate of the step just taken; at η = 0 (the
first warm-up step) nothing can be folded and the residual is dropped. `exact=true` keeps E_t
and applies `M += E_t/η - E_{t+1}/(βη)` (SGD only): the iterates then equal the master-weight
run's exactly. It costs a buffer per weight and exists for tests.

`no_master` drops E (naive master-weight removal); `master` keeps fp32 weights and runs the
forward on q(W) with a straight-through gradient: ECO aims to match it with the memory of
`no_master`. All three log a memory report (bytes held for weights and optimizer state, and
the fp32 scratch a step materializes; the loop measures what is held after the first step).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rlx.errors import RlxError
from rlx.hooks import Hook
from rlx.quant.formats import Quantized, check_rounding, make_format
from rlx.quant.stored import FakeQuantLinear, StoredLinear, swap_modules, trainable_linears

# ---------------------------------------------------------------------------- the corrections


def sgd_correction(residual: Tensor, lr: float, momentum: float) -> Tensor:
    """What ECO adds to an SGD momentum buffer: (1/η)(1 - 1/β) E."""
    return residual * ((1.0 - 1.0 / momentum) / lr)


def adam_correction(residual: Tensor, exp_avg_sq: Tensor, lr: float, beta1: float, beta2: float, eps: float,
                    step: int, decay: float = 0.0) -> Tensor:
    """What ECO adds to Adam's first moment: (1 - ηλ)(bc1/η)(1 - 1/β1)(sqrt(V/bc2) + ε) ⊙ E, with
    torch's bias corrections at the step just taken; `decay` is the decoupled weight decay λ."""
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    denom = exp_avg_sq.sqrt() / math.sqrt(bc2) + eps
    return residual * denom * ((1 - lr * decay) * bc1 * (1 - 1 / beta1) / lr)


# ---------------------------------------------------------------------------- the hooks


class _Quantizer(Hook):
    """Shared by the three: format, rounding, which layers, the swap and the memory report."""

    def __init__(self, format: str = "fp8", scale: str = "channel", bits: int = 4, group_size: int = 32,
                 step: float = 0.05, rounding: str = "nearest", skip: tuple[str, ...] | list[str] = ("lm_head",),
                 seed: int = 0):
        self.fmt = make_format(format, scale, bits, group_size, step)
        self.rounding = check_rounding(rounding)
        self.skip = tuple(skip)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.layers: dict = {}
        self.metrics: dict = {}
        self._reported = False

    def _targets(self, state) -> list:
        layers = trainable_linears(state.model, self.skip)
        if not layers:
            raise RlxError(f"{type(self).__name__.lower()}: the model has no trainable nn.Linear layers to quantize "
                           f"(skipped: {', '.join(self.skip) or 'none'})")
        device = layers[0][1].weight.device
        if device.type != "cpu" and self.generator.device != device:  # SR draws on the weights' device
            self.generator = torch.Generator(device).manual_seed(self.generator.initial_seed())
        return layers

    def encode(self, w: Tensor) -> Quantized:
        return self.fmt.encode(w, self.rounding, self.generator)

    def _report_scratch(self, nbytes: int) -> None:
        """The fp32 weights a step materializes on top of what is held (the loop reports the rest)."""
        if not self._reported:
            self._reported = True
            self.metrics["memory/scratch_MB"] = nbytes / 2**20

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class NoMaster(_Quantizer):
    """Weights held only as codes; after each step W~ is re-encoded and the residual dropped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._resumed: dict[str, Quantized] = {}
        self._lrs: dict[int, float] = {}

    def on_train_start(self, state) -> None:
        with torch.random.fork_rng(devices=[]):
            self.layers = swap_modules(state.model, self._targets(state), lambda m: StoredLinear(m, self.fmt))
        for name, layer in self.layers.items():
            resumed = self._resumed.pop(name, None)
            layer.store(resumed if resumed is not None else self.encode(layer.weight.data))
        self._groups = {id(p): g for g in state.optimizer.param_groups for p in g["params"]}

    def on_before_optimizer_step(self, state) -> None:
        for layer in self.layers.values():
            self._lrs[id(layer.weight)] = self._groups[id(layer.weight)]["lr"]
            layer.materialize()

    def on_step_end(self, state) -> None:
        self._report_scratch(sum(m.weight.data.nbytes for m in self.layers.values()))
        for name, layer in self.layers.items():
            proposed = layer.weight.data  # W~: the base optimizer's step from the quantized weights
            q = self.encode(proposed)
            self.feedback(name, layer.weight, proposed - self.fmt.decode(q), state)
            layer.store(q)

    def feedback(self, name: str, p: Tensor, residual: Tensor, state) -> None:
        """What to do with the rounding residual: nothing, for naive master-weight removal."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "codes": {name: m.q for name, m in self.layers.items() if m.q is not None}}

    def load_state_dict(self, state: dict) -> None:
        # The checkpoint's weights are the decoded codes; the codes themselves make resume exact.
        super().load_state_dict(state)
        self._resumed = dict(state.get("codes", {}))


class ECO(NoMaster):
    """No master weights; the residual is folded into the optimizer's momentum."""

    def __init__(self, *args, exact: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.exact = exact
        self.previous: dict[str, Tensor] = {}  # E_t, kept only when exact
        self.skipped = 0

    def on_train_start(self, state) -> None:
        super().on_train_start(state)
        for group in state.optimizer.param_groups:
            if "betas" not in group and not group.get("momentum"):
                raise RlxError(f"quantizer=eco folds the rounding residual into momentum, and "
                               f"{type(state.optimizer).__name__} has none here: use SGD with momentum > 0 or Adam/AdamW")
            if group.get("nesterov") or group.get("maximize"):
                raise RlxError("quantizer=eco supports SGD momentum without nesterov/maximize")
            if self.exact and "betas" in group:
                raise RlxError("quantizer.exact=true is derived for SGD momentum only")

    def feedback(self, name: str, p: Tensor, residual: Tensor, state) -> None:
        group, moments = self._groups[id(p)], state.optimizer.state[p]
        lr = self._lrs[id(p)]
        if lr == 0:  # a zero-LR step moved nothing: there is no step to fold the residual into
            self.skipped += 1
            return
        if "momentum_buffer" in moments:
            beta = group["momentum"]
            if self.exact:
                moments["momentum_buffer"].add_(self.previous.get(name, torch.zeros_like(residual)) / lr
                                                - residual / (beta * lr))
                self.previous[name] = residual
            else:
                moments["momentum_buffer"].add_(sgd_correction(residual, lr, beta))
        elif "exp_avg" in moments:
            beta1, beta2 = group["betas"]
            sq = moments["max_exp_avg_sq"] if group.get("amsgrad") else moments["exp_avg_sq"]
            decay = group["weight_decay"] if group.get("decoupled_weight_decay") else 0.0
            moments["exp_avg"].add_(adam_correction(residual, sq, lr, beta1, beta2, group["eps"],
                                                    int(moments["step"]), decay))
        else:
            raise RlxError(f"quantizer=eco: {type(state.optimizer).__name__} keeps no momentum_buffer or exp_avg "
                           "state to fold the residual into (ECO supports SGD momentum and Adam/AdamW)")

    def on_train_end(self, state) -> None:
        self.metrics["eco/zero_lr_steps"] = self.skipped / max(len(self.layers), 1)


class MasterWeights(_Quantizer):
    """fp32 master weights, forward on their quantized values (straight-through gradient)."""

    def on_train_start(self, state) -> None:
        quantize = lambda w: self.fmt.decode(self.encode(w))
        with torch.random.fork_rng(devices=[]):
            self.layers = swap_modules(state.model, self._targets(state), lambda m: FakeQuantLinear(m, quantize))

    def on_step_end(self, state) -> None:
        self._report_scratch(sum(m.weight.nbytes for m in self.layers.values()))  # the quantized copy
