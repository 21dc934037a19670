"""EQ-Net: elastic quantization (Xu et al., ICCV 2023, arXiv 2308.07650). One weight-sharing model is
trained across a space of quantization configurations, so that after training any point of the
space can be evaluated without retraining.

    rlx train quantizer=eqnet                                   # weights 2..8 bits, activations in fp
    rlx train quantizer=eqnet quantizer.act_bits=[4,8] algo=grpo

    policy = load_supernet("outputs/.../checkpoints/last")     # after training, in Python;
    # QConfig, evaluate_space and set_config live in rlx/quantizers/lsq.py
    evaluate_space(policy.model, {"w8": QConfig(8), "w2": QConfig(2, per_channel=False, symmetric=True)},
                   lambda m: perplexity(m, policy.tokenizer, examples, 8, 256))

The space, per trainable linear layer (the `skip` layers, lm_head by default, and the embeddings
stay in full precision): weight bits in `weight_bits`, activation bits in `act_bits` (null: no
activation quantization), per-channel or per-tensor weight scales, symmetric or asymmetric codes
(one choice for the weights and the layer's input). A point of the space is a `QConfig` per layer.

Quantizer: LSQ (Esser et al., 2020) with elastic steps, in `rlx/quantizers/lsq.py`.

A training step of the paper, and where each part happens here:
1. WDR-Loss: kurt_rate·mean_l (Kurt(W_l) - 1.8)² + skew_rate·mean_l Skew(W_l)² over the quantized
   weights except the first layer's (1.8 is the kurtosis of a uniform distribution, the shape a
   uniform grid fits). It depends on the weights only, so it is backpropagated once per optimizer
   step, in `on_after_backward`, whatever the number of micro-batches or forward calls.
2. The largest subnet (most bits, per-channel, asymmetric: the most precise point) on the task.
3. num_subnet - 1 more subnets, a random one per layer and, last, the smallest (fewest bits,
   granularity and symmetry drawn per layer as in the reference code), each trained with
   kd_alpha·KL(prev ‖ cur) + (1 - kd_alpha)·task, where prev is the previous subnet's detached
   logits (GPG-Loss: guidance flows largest -> random -> smallest as a chain).

How it fits the one loop: the hook wraps the model's `forward`. In training mode with gradients
on, one call runs the chain on the same inputs and returns the largest subnet's output, so the
algorithm's own loss (any algorithm: SFT, GRPO, DPO...) trains it. The KL chain is attached to
the returned logits by an identity autograd function whose backward also sends gradient 1 to it
(DeepSeek-MoE's AddAuxiliaryLoss), divided by `trainer.grad_accum` so that it is averaged (uniformly)
over the step's micro-batches. The task loss cannot be evaluated at the smaller subnets' logits
without the algorithm, so it reaches them straight-through: the returned logits are
largest + (1 - kd_alpha)·Σ_k (logits_k - logits_k.detach()), equal in value to the largest's, and
the algorithm's gradient at the largest's logits flows into every smaller subnet with weight
(1 - kd_alpha). It equals the task gradient at the subnet's own logits to first order, as the KL
chain pulls those logits together. The algorithm must take its loss from `.logits` (every rlx
algorithm does; a loss the model computes from `labels` carries neither term). A training forward
costs num_subnet forward passes, whose activations are held until the algorithm's backward.

Any other forward (eval mode or no grad: generation, evaluation, reference and old log-prob
passes) runs the layers' current configuration: the largest, unless `set_config` chose another
point. The LSQ steps are trained by their own Adam (`lsq_lr`, following the trainer's LR
schedule), stepped in `on_before_optimizer_step` and checkpointed with the hook's state, so the
loop's optimizer, its param groups and its checkpoint are those of a run without quantization.
Checkpoints hold plain transformers weights; `load_supernet` rebuilds the elastic model from one.
Logged per step: eqnet/kd (the chain's KL, summed over its links), eqnet/wdr, eqnet/random_bits
(the random subnets' mean weight bits).

Left out: the paper's accuracy predictor (CQAP) and its genetic mixed-precision search, and the
reference code's 8-bit pin of the first and last quantized layers.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from rlx.errors import RlxError
from rlx.hooks import Hook
from rlx.layers import trainable_linears
from rlx.quantizers.lsq import ElasticQuantLinear, QConfig, make_space
from rlx.quantizers.stored import swap_modules
from rlx.robustness import kurtosis, skewness

UNIFORM_KURTOSIS = 1.8


def wdr_loss(weights: list[Tensor], kurt_rate: float, skew_rate: float) -> Tensor:
    """EQ-Net's weight distribution regularization: each tensor pulled towards the kurtosis of a
    uniform distribution and zero skewness, both averaged over the tensors."""
    kurt = torch.stack([(kurtosis(w) - UNIFORM_KURTOSIS) ** 2 for w in weights]).mean()
    skew = torch.stack([skewness(w) ** 2 for w in weights]).mean()
    return kurt_rate * kurt + skew_rate * skew


def kd_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) at T = 1, summed over the vocabulary and averaged
    over the positions where `mask` (the attention mask) is 1."""
    t, s = teacher.float().log_softmax(-1), student.float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask[:, -kl.shape[1]:].to(kl.dtype)  # with a cache the mask also covers past positions
    return (kl * m).sum() / m.sum().clamp_min(1)


class _WithAuxLoss(torch.autograd.Function):
    """Identity on `x`; its backward also gives the scalar `aux` gradient 1, so the loss the
    algorithm computes from `x` backpropagates `aux` with it (DeepSeek-MoE's AddAuxiliaryLoss)."""

    @staticmethod
    def forward(ctx, x: Tensor, aux: Tensor) -> Tensor:
        ctx.one = torch.ones_like(aux)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, ctx.one


def load_supernet(checkpoint: str | Path, device: str = "auto"):
    """The `Policy` of a quantizer=eqnet checkpoint with its LSQ steps, in eval mode at the largest
    point: the weights load as an ordinary transformers model, the steps from the hook's state."""
    from rlx.config import build
    from rlx.models import hf
    from rlx.state import STATE_FILE, find_checkpoint

    folder = find_checkpoint(checkpoint)
    saved = folder / "rlx_config.yaml"
    quantizer = OmegaConf.load(saved).quantizer if saved.exists() else None
    if quantizer is None or quantizer.get("_target_") != f"{__name__}.EQNet":
        raise RlxError(f"{folder} was not trained with quantizer=eqnet")
    policy = hf(str(folder), device=device, dtype="float32")
    saved_state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)["hooks"]["quantizer"]
    build(quantizer).attach(policy.model, saved_state["layers"])
    policy.model.eval()
    return policy


# ---------------------------------------------------------------------------- the hook


class EQNet(Hook):
    def __init__(self, weight_bits=(2, 8), act_bits=None, granularity=("channel", "tensor"), symmetric=(False, True),
                 num_subnet: int = 3, kd_alpha: float = 0.5, kurt_rate: float = 0.015, skew_rate: float = 1.0,
                 lsq_lr: float = 1e-5, skip: tuple[str, ...] | list[str] = ("lm_head",), seed: int = 0):
        if num_subnet < 1:
            raise RlxError("quantizer.num_subnet must be >= 1")
        if not 0 <= kd_alpha <= 1 or min(kurt_rate, skew_rate, lsq_lr) < 0:
            raise RlxError("quantizer.kd_alpha must be in [0, 1]; kurt_rate, skew_rate and lsq_lr must be >= 0")
        self.space = make_space(weight_bits, act_bits, granularity, symmetric)
        self.num_subnet, self.kd_alpha = num_subnet, kd_alpha
        self.grad_accum = 1  # micro-batches per step (trainer.grad_accum), known at on_train_start
        self.kurt_rate, self.skew_rate, self.lsq_lr = kurt_rate, skew_rate, lsq_lr
        self.skip = tuple(skip)
        self.generator = torch.Generator().manual_seed(seed)
        self.layers: dict[str, ElasticQuantLinear] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self._resumed: dict | None = None
        self._kd: list[Tensor] = []
        self._bits: list[float] = []

    # ------------------------------------------------------------------ install

    def attach(self, model: nn.Module, layer_states: dict | None = None) -> None:
        """Swap the trainable linear layers for elastic ones (with saved steps, if given) and wrap
        the model's forward in the subnet chain."""
        targets = trainable_linears(model, self.skip)
        if not targets:
            raise RlxError(f"quantizer=eqnet: the model has no trainable nn.Linear layers to quantize "
                           f"(skipped: {', '.join(self.skip) or 'none'})")
        self.layers = swap_modules(model, targets, lambda m: ElasticQuantLinear(m, self.space))
        if layer_states is not None:
            if set(layer_states) != set(self.layers):
                raise RlxError("the checkpoint's quantizer=eqnet layers differ from this model's")
            for name, layer in self.layers.items():
                layer.load_quant_state(layer_states[name])
        original = model.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if model.training and torch.is_grad_enabled():
                return self._chain(original, args, kwargs)
            return original(*args, **kwargs)

        model.forward = forward

    def on_train_start(self, state) -> None:
        self.grad_accum = state.trainer.grad_accum
        resumed, self._resumed = self._resumed, None
        self.attach(state.model, resumed["layers"] if resumed else None)
        params = [t for layer in self.layers.values() for t in layer.held_tensors()]
        self.optimizer = torch.optim.Adam(params, lr=self.lsq_lr)
        if resumed:
            self.optimizer.load_state_dict(resumed["optimizer"])

    # ------------------------------------------------------------------ a training forward

    def _choose(self, options: tuple):
        return options[int(torch.randint(len(options), (), generator=self.generator))]

    def subnets(self) -> list[dict[str, QConfig]]:
        """The step's chain, one QConfig per layer: the largest, random ones, the smallest."""
        chain = [dict.fromkeys(self.layers, self.space.largest())]
        for k in range(1, self.num_subnet):
            pick = self.space.smallest if k == self.num_subnet - 1 else self.space.random
            chain.append({name: pick(self._choose) for name in self.layers})
        return chain

    def _chain(self, forward: Callable, args: tuple, kwargs: dict):
        """Run every subnet of the chain on the same inputs; return the largest's output carrying the
        KL chain (as an auxiliary loss) and the smaller subnets' straight-through task share."""
        resting = {name: layer.config for name, layer in self.layers.items()}
        chain = self.subnets()
        try:
            self._use(chain[0])
            out = forward(*args, **kwargs)
            if not hasattr(out, "logits"):
                raise RlxError("quantizer=eqnet needs a model whose forward returns an output with .logits")
            prev, share, kd = out.logits, 0.0, []
            for k, subnet in enumerate(chain[1:], start=1):
                self._use(subnet)
                cur = forward(*args, **kwargs).logits
                kd.append(kd_loss(cur, prev.detach(), kwargs.get("attention_mask")))
                share = share + (cur - cur.detach())
                prev = cur
                if k < self.num_subnet - 1:  # a random subnet
                    self._bits.append(sum(c.bits for c in subnet.values()) / len(subnet))
        finally:
            self._use(resting)
        if kd:
            total = torch.stack(kd).sum()
            self._kd.append(total.detach())
            out.logits = _WithAuxLoss.apply(out.logits + (1 - self.kd_alpha) * share,
                                            self.kd_alpha * total / self.grad_accum)
        return out

    def _use(self, configs: dict[str, QConfig]) -> None:
        for name, config in configs.items():
            self.layers[name].config = config

    # ------------------------------------------------------------------ the step

    def on_after_backward(self, state) -> None:
        weights = [layer.weight for layer in list(self.layers.values())[1:]]
        if weights and (self.kurt_rate or self.skew_rate):
            loss = wdr_loss(weights, self.kurt_rate, self.skew_rate)
            loss.backward()
            self.metrics["eqnet/wdr"] = loss.item()

    def on_before_optimizer_step(self, state) -> None:
        group = state.optimizer.param_groups[0]  # the steps follow the trainer's schedule
        factor = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
        for g in self.optimizer.param_groups:
            g["lr"] = self.lsq_lr * factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # a key left out of the next chain must not move

    def on_step_end(self, state) -> None:
        if self._kd:
            self.metrics["eqnet/kd"] = torch.stack(self._kd).mean().item()
        if self._bits:
            self.metrics["eqnet/random_bits"] = sum(self._bits) / len(self._bits)
        self._kd, self._bits = [], []

    def held_tensors(self) -> Iterator[Tensor]:
        """The state of the hook's own Adam over the steps (the steps are the layers' own)."""
        for moments in (self.optimizer.state.values() if self.optimizer is not None else ()):
            yield from (t for key, t in moments.items() if key != "step" and isinstance(t, Tensor))

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(),
                "layers": {name: layer.quant_state() for name, layer in self.layers.items()},
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        # Loaded before on_train_start: the steps and their optimizer are restored at the swap.
        self.generator.set_state(state["generator"])
        self._resumed = state
