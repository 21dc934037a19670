"""Quantization-aware training in two phases, full precision then QAT, with the switch placed by
the compute-optimal law of Dremov et al. (2025) and optional cooldown/QAT fusion.

    rlx train quantizer=qat                                  # 4-bit weights, switch at the predicted step
    rlx train quantizer=qat quantizer.start=0.9              # QAT for the last 10% of the steps
    rlx train quantizer=qat quantizer.bits=2 quantizer.fuse_cooldown=true trainer.lr_scheduler=constant_with_warmup

Fake quantization is torchao's (`QATConfig` with `IntxFakeQuantizeConfig`: symmetric group-wise
integer weights, optionally asymmetric per-token activations, straight-through gradients). Its
`FakeQuantizedLinear` layers are installed at the start with fake quantization off, and switched
on at the start of step `switch`, so steps [0, switch) are full precision and [switch, T) QAT.

`start=compute_optimal` predicts the QAT fraction from tokens per parameter byte,
S = D / (N·B/8), as f = exp(-6.7297 / ln S), and switches at round((1 - f)·T). N counts all
parameters of the model (as the paper does); D is `tokens` when given, else the tokens of the
first step times T (the switch is then decided after step 1). S, f and the switch step are logged.

Learning rate. With `fuse_cooldown=true` the LR decays linearly to zero during the QAT phase and
stays at the peak before it (the cooldown is fused into QAT). With `cooldown=c` and no fusion,
the full-precision phase has its own linear cooldown over its last fraction c, and the QAT phase
restarts at the peak and decays again: the cost fusion saves. Either multiplies the trainer's
schedule, which must then be constant (with or without warm-up). With neither, the LR is the
trainer's alone.

At the end the quantized model is exported to `<run>/quantized/`: a transformers checkpoint whose
quantized weights lie exactly on the grid, plus `quantization.safetensors` (int8 codes and fp32
scales per layer) and `quantization.json` (how to decode them).
"""
from __future__ import annotations

import json
import math

import torch
from safetensors.torch import save_file

from rlx.errors import RlxError
from rlx.hooks import Hook
from rlx.layers import trainable_linears

LAW_A = 6.7297  # the fitted constant of f = exp(-a / ln S)


def qat_fraction(tokens: float, params: int, bits: int) -> tuple[float, float]:
    """(S, f): tokens per parameter byte and the predicted loss-optimal QAT fraction."""
    s = tokens / (params * bits / 8)
    if s <= 1:
        return s, 0.0  # below one token per byte the law has no support: no QAT phase
    return s, min(1.0, math.exp(-LAW_A / math.log(s)))


def switch_step(total_steps: int, fraction: float) -> int:
    """The first QAT step when the last `fraction` of `total_steps` is QAT."""
    return round((1 - fraction) * total_steps)


def lr_multiplier(step: int, switch: int, total: int, fused: bool, cooldown: float | None) -> float:
    """The phase schedule's factor on the trainer's (constant) LR for 0-based `step`."""
    if step >= switch:  # QAT phase: linear decay to zero, in both modes
        return (total - step) / max(total - switch, 1)
    if fused or not cooldown:
        return 1.0
    decay = max(round(cooldown * switch), 1)  # the full-precision cooldown that fusion removes
    return min(1.0, (switch - step) / decay)


def _int_dtype(bits: int) -> torch.dtype:
    if not 1 <= bits <= 8:
        raise RlxError(f"quantizer.bits={bits} is out of range; QAT supports 1..8-bit weights")
    return torch.int8 if bits == 8 else getattr(torch, f"int{bits}")


class QAT(Hook):
    def __init__(self, bits: int = 4, group_size: int = 32, act_bits: int | None = None,
                 start: float | int | str = "compute_optimal", tokens: float | None = None,
                 fuse_cooldown: bool = False, cooldown: float | None = None,
                 skip: tuple[str, ...] | list[str] = ("lm_head",),
                 enabled: bool = True, export: bool = True):
        self.bits, self.group_size, self.act_bits = bits, group_size, act_bits
        self.weight_dtype = _int_dtype(bits)
        if act_bits is not None:
            _int_dtype(act_bits)
        self.start, self.tokens = start, tokens
        self.total = 1  # the run's steps (trainer.max_steps), known at on_train_start
        self.fused, self.cooldown = fuse_cooldown, cooldown
        self.owns_lr = fuse_cooldown or bool(cooldown)
        if start != "compute_optimal" and not (isinstance(start, (int, float)) and start >= 0):
            raise RlxError(f"quantizer.start={start!r}: use compute_optimal, a fraction in [0, 1) or a step")
        self.skip, self.enabled, self.export = tuple(skip), enabled, export
        self.switch: int | None = None
        self.layers: dict = {}

    # ------------------------------------------------------------------ events

    def on_train_start(self, state) -> None:
        if not self.enabled:
            return
        self.total = state.trainer.max_steps
        if self.owns_lr and state.trainer.lr_scheduler not in ("constant", "constant_with_warmup"):
            raise RlxError("quantizer=qat with fuse_cooldown or cooldown sets the LR decay itself: "
                           "use trainer.lr_scheduler=constant_with_warmup (or constant)")
        self._install(state.model)
        if self.switch is None and self.start != "compute_optimal":
            self.switch = round(self.start * self.total) if self.start < 1 else int(self.start)
        elif self.switch is None and self.tokens is not None:
            self._predict(state, self.tokens)
        self._set_fake_quant(self.switch is not None and state.step >= self.switch)

    def on_step_start(self, state) -> None:
        if self.enabled and self.switch is not None and state.step == self.switch:
            self._set_fake_quant(True)
            self.metrics["qat/switch_step"] = self.switch

    def on_before_optimizer_step(self, state) -> None:
        if self.enabled and self.owns_lr:
            switch = self.switch if self.switch is not None else self.total  # not decided yet: FP
            m = lr_multiplier(state.step, switch, self.total, self.fused, self.cooldown)
            for group in state.optimizer.param_groups:
                group["lr"] *= m

    def on_step_end(self, state) -> None:
        if self.enabled and self.switch is None and self.start == "compute_optimal":
            self._predict(state, state.tokens * self.total / state.step)
            if self.switch <= state.step:  # a QAT phase of (nearly) the whole run: it starts now
                self.switch = state.step

    def on_train_end(self, state) -> None:
        if self.enabled and self.export and getattr(state, "run_dir", None) is not None:
            self.export_quantized(state, state.run_dir / "quantized")

    # ------------------------------------------------------------------ pieces

    def _predict(self, state, tokens: float) -> None:
        params = sum(p.numel() for p in state.model.parameters())
        s, f = qat_fraction(tokens, params, self.bits)
        self.switch = switch_step(self.total, f)
        self.metrics.update({"qat/tokens_per_param_byte": s, "qat/fraction": f, "qat/planned_switch_step": self.switch,
                             "qat/planned_tokens": tokens})

    def _install(self, model) -> None:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        weights = IntxFakeQuantizeConfig(self.weight_dtype, group_size=self.group_size, is_symmetric=True)
        acts = (IntxFakeQuantizeConfig(_int_dtype(self.act_bits), "per_token", is_symmetric=False)
                if self.act_bits is not None else None)
        chosen = {id(m) for _, m in trainable_linears(model, self.skip)}

        def wanted(m, name):
            return id(m) in chosen
        with torch.random.fork_rng(devices=[]):  # new layers draw an init that is then replaced
            quantize_(model, QATConfig(activation_config=acts, weight_config=weights, step="prepare"), filter_fn=wanted)
        from torchao.quantization.qat.linear import FakeQuantizedLinear

        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}
        if not self.layers:
            raise RlxError("quantizer=qat: the model has no trainable nn.Linear layers to quantize")
        bad = [n for n, m in self.layers.items() if m.in_features % self.group_size]
        if bad:
            raise RlxError(f"quantizer.group_size={self.group_size} does not divide the input width of {bad[0]}")

    def _set_fake_quant(self, on: bool) -> None:
        from torchao.quantization.qat.linear import disable_linear_fake_quant, enable_linear_fake_quant

        for layer in self.layers.values():
            (enable_linear_fake_quant if on else disable_linear_fake_quant)(layer)

    @torch.no_grad()
    def quantized_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """{layer: (weight on the grid, int8 codes, per-group scales)} from the fake quantizer itself."""
        out = {}
        for name, layer in self.layers.items():
            fq = layer.weight_fake_quantizer
            enabled, fq.enabled = fq.enabled, True
            w = fq(layer.weight.detach().float())
            fq.enabled = enabled
            scales = fq.scale.float().reshape(w.shape[0], -1)
            codes = torch.round(w.reshape(w.shape[0], -1, self.group_size) / scales[..., None]).to(torch.int8)
            if not torch.equal((codes.float() * scales[..., None]).reshape(w.shape), w):
                raise RlxError(f"quantizer=qat: the fake-quantized weight of {name} does not decode from its codes")
            out[name] = (w, codes.reshape(w.shape), scales)
        return out

    def export_quantized(self, state, out) -> None:
        quantized = self.quantized_weights()
        weights = state.model.state_dict()
        for name, (w, _, _) in quantized.items():
            weights[f"{name}.weight"] = w.to(weights[f"{name}.weight"].dtype)
        out.mkdir(parents=True, exist_ok=True)
        state.model.save_pretrained(out, state_dict=weights)
        state.tokenizer.save_pretrained(out)
        save_file({f"{n}.{k}": t.contiguous() for n, (_, c, s) in quantized.items() for k, t in (("codes", c), ("scales", s))},
                  out / "quantization.safetensors")
        (out / "quantization.json").write_text(json.dumps({
            "method": "qat", "bits": self.bits, "group_size": self.group_size, "symmetric": True,
            "act_bits": self.act_bits, "layers": sorted(quantized),
            "decode": "weight[r, g*group_size:(g+1)*group_size] = codes[r, ...] * scales[r, g]"}, indent=2))
        self.metrics["qat/exported"] = 1

    def state_dict(self) -> dict:
        return {"switch": self.switch}

    def load_state_dict(self, state: dict) -> None:
        self.switch = state.get("switch")
