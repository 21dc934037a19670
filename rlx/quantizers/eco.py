"""ECO: quantized training without full-precision master weights (Nikdan et al., 2026), and the
two baselines it is measured against.

    rlx train quantizer=eco                          # FP8 E4M3 weights, per-row scales
    rlx train quantizer=eco quantizer.format=int quantizer.bits=4 quantizer.rounding=stochastic
    rlx train quantizer=no_master                    # the same storage, residual dropped
    rlx train quantizer=master                       # fp32 master weights, quantized forward

The trainable linear layers hold only codes (rlx/quantizers/stored.py). Each step the base optimizer
(any torch SGD-momentum or Adam/AdamW) proposes W~ = Ŵ - η·U from the quantized Ŵ; W~ is encoded
again, and the rounding residual E = W~ - q(W~) is folded into the first moment so the next
steps re-apply it. With a constant LR this is the paper's momentum pull-back (E_t ≈ E_{t+1}):

    SGD (torch's heavy-ball or EMA form; weight decay is in the gradient):
        M += (1/η)(1 - 1/β) E
    Adam/AdamW, whose step is η·M/d with d = bc1·(sqrt(V/bc2) + ε):
        M += (1 - ηλ)·(1/η)·(1 - 1/β1)·d ⊙ E       (λ: decoupled decay only)

Under an LR schedule the derivation splits the factor between the two steps it links: the
residual's earlier share leaves with the LR (and bias corrections) of the step just taken, η_t,
and the share the next step must re-apply enters with that step's, η_{t+1}:
M += E (1/η_t - 1/(β η_{t+1})) for SGD, and the same with d_t, d_{t+1} and (1 - ηλ) for Adam
(`sgd_correction`, `adam_correction`). Using η_t for both, as the paper's constant-LR form
does, re-applies only η_{t+1}/η_t of the residual each step, which leaves a bias wherever the
schedule moves (warm-up, cosine decay). The (1 - ηλ) factor also follows from the derivation
(the paper's Algorithm 3 omits it: an O(ηλ) difference). A step with η_t = 0 (the first warm-up
step) or η_{t+1} = 0 (the end of a decay) cannot carry a correction, and its residual is dropped.
`exact=true` keeps E_t and applies `M += E_t/η_t - E_{t+1}/(β η_{t+1})` (SGD only): the
iterates then equal the master-weight run's to rounding error, under any schedule whose LR stays
positive after the first step, provided the initial weights lie on the grid (q(W_0) = W_0) and
there is no weight decay. An off-grid start's residual E_0 is never re-applied (there is no
earlier step to carry it), so the runs differ by up to |E_0| (~1e-2 on a 0.05 grid) before
momentum mixes it away; SGD's weight decay is coupled, taken at Ŵ_t rather than the master
weights, so every gradient differs from the master run's by λE_t. It costs a buffer per weight
and exists for tests.

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
from rlx.layers import trainable_linears
from rlx.quantizers.formats import Quantized, check_rounding, make_format
from rlx.quantizers.stored import FakeQuantLinear, StoredLinear, swap_modules

# ---------------------------------------------------------------------------- the corrections


def sgd_correction(residual: Tensor, lr: float, next_lr: float, momentum: float) -> Tensor:
    """What ECO adds to an SGD momentum buffer: E (1/η_t - 1/(β η_{t+1})); with a constant LR the
    paper's (1/η)(1 - 1/β) E."""
    return residual * (1.0 / lr - 1.0 / (momentum * next_lr))


def _adam_scale(exp_avg_sq: Tensor, beta1: float, beta2: float, eps: float, step: int) -> Tensor:
    """1/h: what turns Adam's step η·h·M at optimizer step `step` back into momentum units."""
    return (1 - beta1**step) * (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step) + eps)


def adam_correction(residual: Tensor, exp_avg_sq: Tensor, lr: float, next_lr: float, beta1: float, beta2: float,
                    eps: float, step: int, decay: float = 0.0) -> Tensor:
    """What ECO adds to Adam's first moment after optimizer step `step` (torch's count, from 1):

        E ⊙ [(1 - η_t λ)/η_t · d_t - (1 - η_{t+1} λ)/(β1 η_{t+1}) · d_{t+1}],
        d_t = bc1(t) (sqrt(V / bc2(t)) + ε),   d_{t+1} = bc1(t+1) (sqrt(V / bc2(t)) + ε)

d_{t+1} predicts the next step's denominator from the current bias-corrected second moment:
dividing V by bc2(t+1) instead would underestimate it by the factor sqrt(bc2(t)/bc2(t+1)) (0.954
at step 10 with β2 = 0.999), which shrinks the bracket, a difference of two near-equal terms, by
about a third at step 10 and 5% at step 100 (constant LR, ε ≪ sqrt(V)), so too little of the
residual would be re-applied.

    with λ the decoupled weight decay. With a constant LR and bias corrections this is the
    paper's (1 - ηλ)(1/η)(1 - 1/β1) d ⊙ E."""
    now = _adam_scale(exp_avg_sq, beta1, beta2, eps, step) * ((1 - lr * decay) / lr)
    denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step) + eps
    later = (1 - beta1 ** (step + 1)) * denom * ((1 - next_lr * decay) / (beta1 * next_lr))
    return residual * (now - later)


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
        # SGD's buffer, or Adam's first moment (Adam is recognised by its second one: Lion keeps an exp_avg too)
        moment = moments.get("momentum_buffer", moments.get("exp_avg") if "exp_avg_sq" in moments else None)
        if type(moment) is not Tensor or moment.shape != residual.shape:  # a subclass: quantized state
            raise RlxError(f"quantizer=eco folds the rounding residual into each weight's SGD or Adam momentum, and "
                           f"{type(state.optimizer).__name__} keeps none in the weight's shape (its state lives in a "
                           "subspace, is quantized, is another kind, or is absent): use SGD with momentum or Adam/AdamW")
        lr, next_lr = self._lrs[id(p)], group["lr"]  # the loop has already stepped the scheduler
        if lr == 0 or next_lr == 0:  # no step before or after to carry the residual
            self.skipped += 1
            return
        if "momentum_buffer" in moments:
            beta = group["momentum"]
            if self.exact:
                previous = self.previous.get(name, torch.zeros_like(residual))
                moments["momentum_buffer"].add_(previous / lr - residual / (beta * next_lr))
                self.previous[name] = residual
            else:
                moments["momentum_buffer"].add_(sgd_correction(residual, lr, next_lr, beta))
        else:
            beta1, beta2 = group["betas"]
            sq = moments["max_exp_avg_sq"] if group.get("amsgrad") else moments["exp_avg_sq"]
            decay = group["weight_decay"] if group.get("decoupled_weight_decay") else 0.0
            moments["exp_avg"].add_(adam_correction(residual, sq, lr, next_lr, beta1, beta2, group["eps"],
                                                    int(moments["step"]), decay))

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
