"""How robust a model is to post-training quantization (PTQ), measured before quantizing it.

The setting is W{bits}A{bits} round-to-nearest: every nn.Linear of the decoder blocks gets its
weight quantized symmetrically with one abs-max scale per row, and its input per token the same
way. Embeddings and the LM head stay in full precision, as is usual in PTQ.

    report = robustness_report(model, batch, bits=4)   # a transformers causal LM, an `lm_batch`
    report["R_L"], report["ptq_loss_increase"], report["mmr_mean"], report["kurtosis_mean"]

Three kinds of predictor ("Beyond Outliers: A Study of Optimizers Under Quantization",
arXiv 2509.23500):

- outlier statistics of each linear layer's input: the max-to-mean ratio max|x| / mean|x| (MMR),
  the max-to-median ratio max|x| / median|x|, and the kurtosis E[(x - mu)^4] / sigma^4;
- relative error propagation through the blocks h_l = f_l(h_{l-1}), against the quantized
  trajectory h^q_l = f^q_l(h^q_{l-1}). The error splits symmetrically into the part the block
  receives and the part it adds:

      a_l = ½[(f(h^q) - f(h)) + (f^q(h^q) - f^q(h))]     input change (propagated error)
      b_l = ½[(f^q(h) - f(h)) + (f^q(h^q) - f(h^q))]     function change (local error)

  a_l + b_l = h^q_l - h_l exactly, and R_l = |a + b|² / |h|² = A_l + B_l + C_l with
  A = |a|²/|h|², B = |b|²/|h|², C = 2<a, b>/|h|². The gain G_l = A_l / R_{l-1} says how much a
  block amplifies the error it is given. The terminal error R_L is the paper's best predictor
  of PTQ degradation (rank correlation -0.89 with post-PTQ accuracy, against 0.62 for MMR and
  0.70 for kurtosis);
- the PTQ loss increase itself: next-token cross-entropy of the quantized model minus that of
  the full-precision one, which is what the predictors are meant to foretell.

`RobustnessProbe` is the hook that logs these during training (`rlx train hooks=robustness`).
"""
from __future__ import annotations

import contextlib
import random

import torch
from torch import Tensor, nn

from rlx.data.collate import IGNORE, lm_batch, token_nll
from rlx.errors import RlxError
from rlx.hooks import Hook
from rlx.quantizers.formats import IntN

# ---------------------------------------------------------------------------- outlier statistics


def max_to_mean(x: Tensor) -> float:
    """max|x| / mean|x|: how far the largest magnitude stands above the typical one (the MMR)."""
    a = x.detach().abs().double()
    return (a.max() / a.mean()).item()


def max_to_median(x: Tensor) -> float:
    """max|x| / median|x|: as MMR, but the typical magnitude is not itself pulled up by outliers
    (the median of an even count is the lower middle value, as in torch.median)."""
    a = x.detach().abs().double().flatten()
    return (a.max() / a.median()).item()


def _standardized(x: Tensor) -> Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32)).flatten()
    return (x - x.mean()) / x.std(correction=0).clamp_min(1e-12)


def kurtosis(x: Tensor) -> Tensor:
    """E[(x - mu)^4] / sigma^4 (population, not excess): 3 for a Gaussian, 1.8 for a uniform,
    large when a few values dominate. Differentiable: EQ-Net's weight regularizer uses it."""
    return _standardized(x).pow(4).mean()


def skewness(x: Tensor) -> Tensor:
    """E[(x - mu)^3] / sigma^3: 0 for any symmetric distribution."""
    return _standardized(x).pow(3).mean()


# ---------------------------------------------------------------------------- error propagation


def split_error(f_h: Tensor, f_hq: Tensor, fq_h: Tensor, fq_hq: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b): the output error f^q(h^q) - f(h) split into input change and function change,
    each averaged over the two orders of applying the changes, so neither order is favoured."""
    a = 0.5 * ((f_hq - f_h) + (fq_hq - fq_h))
    b = 0.5 * ((fq_h - f_h) + (fq_hq - f_hq))
    return a, b


def relative_terms(a: Tensor, b: Tensor, h: Tensor) -> dict[str, float]:
    """A, B, C and R = |a + b|²/|h|² (= A + B + C), in float64 so the identity holds to rounding."""
    a, b, h = a.double(), b.double(), h.double()
    norm = h.pow(2).sum()
    return {
        "A": (a.pow(2).sum() / norm).item(),
        "B": (b.pow(2).sum() / norm).item(),
        "C": (2 * (a * b).sum() / norm).item(),
        "R": ((a + b).pow(2).sum() / norm).item(),
    }


# ---------------------------------------------------------------------------- RTN quantization


def quantize_tokens(x: Tensor, bits: int) -> Tensor:
    """Symmetric abs-max round-to-nearest fake quantization with one scale per token (last dim)."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero token stays zero
    return (torch.round(x / scale).clamp(-qmax - 1, qmax) * scale).to(x.dtype)


def _linears(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Linear]]:
    return [(prefix + name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]


@contextlib.contextmanager
def quantized(module: nn.Module, bits: int):
    """Inside the `with`, every nn.Linear in `module` runs W{bits}A{bits}: its weight RTN-quantized
    per row, its input per token. Weights and hooks are restored on exit, whatever happens."""
    fmt = IntN(bits, group_size=0)
    linears = [m for _, m in _linears(module)]
    saved = [m.weight.data for m in linears]
    handles = []
    try:
        for m in linears:
            m.weight.data = fmt.decode(fmt.encode(m.weight.data))
            handles.append(m.register_forward_pre_hook(lambda _, args: (quantize_tokens(args[0], bits), *args[1:])))
        yield module
    finally:
        for m, w in zip(linears, saved, strict=True):
            m.weight.data = w
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------- model level


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The blocks f_l of a transformers decoder-only model (`model.model.layers` for Llama)."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise RlxError(f"{type(model).__name__} has no decoder layers (model.model.layers): "
                       "robustness metrics need a transformers causal LM")
    return layers


def _lm_labels(batch: dict) -> dict:
    """Every real token is a target (padding is not), whatever the batch's own labels train on."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


@torch.no_grad()
def lm_loss(model: nn.Module, batch: dict, bits: int | None = None) -> float:
    """Mean next-token cross-entropy over the batch's real tokens; W{bits}A{bits} if `bits` is given."""
    scope = quantized(decoder_layers(model), bits) if bits else contextlib.nullcontext()
    with scope:
        nll, n = token_nll(model, _lm_labels(batch))
    return (nll / n).item()


def _block_inputs(model: nn.Module, layers: nn.ModuleList, batch: dict) -> list[tuple[Tensor, tuple, dict]]:
    """Run the model once and keep what each block was called with: (hidden state, other args, kwargs)."""
    calls: list[tuple[Tensor, tuple, dict]] = []

    def keep(_, args, kwargs):
        kwargs = dict(kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        calls.append((h, args[1:], kwargs))

    handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in layers]
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _call(block: nn.Module, h: Tensor, args: tuple, kwargs: dict) -> Tensor:
    out = block(h, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older transformers return (hidden_states, ...)


@torch.no_grad()
def error_propagation(model: nn.Module, batch: dict, bits: int) -> list[dict[str, float]]:
    """Per block: A, B, C, R along the full-precision and the quantized trajectory (real tokens
    only), and the gain G = A / R_{l-1} (absent for the first block, whose input is exact)."""
    layers = decoder_layers(model)
    fp = _block_inputs(model, layers, batch)
    with quantized(layers, bits):
        hq = _block_inputs(model, layers, batch)
    real = batch["attention_mask"].bool()
    out: list[dict[str, float]] = []
    for block, (h, args, kwargs), (h_q, _, _) in zip(layers, fp, hq, strict=True):
        f_h, f_hq = _call(block, h, args, kwargs), _call(block, h_q, args, kwargs)
        with quantized(block, bits):
            fq_h, fq_hq = _call(block, h, args, kwargs), _call(block, h_q, args, kwargs)
        a, b = split_error(f_h[real], f_hq[real], fq_h[real], fq_hq[real])
        terms = relative_terms(a, b, f_h[real])
        if out:
            terms["G"] = terms["A"] / out[-1]["R"] if out[-1]["R"] > 0 else float("nan")
        out.append(terms)
    return out


@torch.no_grad()
def linear_statistics(model: nn.Module, batch: dict) -> dict[str, dict[str, float]]:
    """Per nn.Linear of the decoder blocks: MMR, max-to-median and kurtosis of its input over the
    batch's real tokens, and the kurtosis of its weight."""
    real = batch["attention_mask"].bool()
    inputs: dict[str, Tensor] = {}

    def keeper(name: str):
        def keep(_, args):
            x = args[0]
            inputs[name] = x[real] if x.shape[:2] == real.shape else x.reshape(-1, x.shape[-1])
        return keep

    linears = _linears(decoder_layers(model), "layers.")
    handles = [m.register_forward_pre_hook(keeper(name)) for name, m in linears]
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: {"mmr": max_to_mean(inputs[name]), "max_to_median": max_to_median(inputs[name]),
                   "kurtosis": kurtosis(inputs[name].double()).item(),
                   "weight_kurtosis": kurtosis(m.weight.detach().double()).item()}
            for name, m in linears}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@torch.no_grad()
def robustness_report(model: nn.Module, batch: dict, bits: int = 4) -> dict:
    """Everything above for one batch (`input_ids`, `attention_mask`); the model is left as it was.

    Returns `layers` (per block: A, B, C, R, G), `linears` (per linear layer: mmr, max_to_median,
    kurtosis, weight_kurtosis), their averages over layers, the terminal R_L, A_L, B_L, C_L, the
    mean gain (with two blocks or more), and loss_fp, loss_quantized and ptq_loss_increase."""
    IntN(bits, group_size=0)  # an unsupported width or model fails here, in one line, before any work
    decoder_layers(model)
    batch = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask")}
    layers = error_propagation(model, batch, bits)
    linears = linear_statistics(model, batch)
    loss_fp, loss_q = lm_loss(model, batch), lm_loss(model, batch, bits)
    gains = [layer["G"] for layer in layers[1:]]
    stats = list(linears.values())
    return {
        "bits": bits,
        "layers": layers,
        "linears": linears,
        **{f"{k}_L": layers[-1][k] for k in ("R", "A", "B", "C")},
        **({"gain_mean": _mean(gains)} if gains else {}),  # a single block has no gain
        "mmr_mean": _mean([s["mmr"] for s in stats]),
        "max_to_median_mean": _mean([s["max_to_median"] for s in stats]),
        "kurtosis_mean": _mean([s["kurtosis"] for s in stats]),
        "weight_kurtosis_mean": _mean([s["weight_kurtosis"] for s in stats]),
        "loss_fp": loss_fp,
        "loss_quantized": loss_q,
        "ptq_loss_increase": loss_q - loss_fp,
    }


SCALARS = ("R_L", "A_L", "B_L", "C_L", "gain_mean", "mmr_mean", "max_to_median_mean", "kurtosis_mean",
           "weight_kurtosis_mean", "loss_fp", "loss_quantized", "ptq_loss_increase")


def scalars(report: dict, prefix: str = "robustness/") -> dict[str, float]:
    """The report's loggable numbers: the summary values and each block's R."""
    out = {prefix + k: float(report[k]) for k in SCALARS if k in report}
    out.update({f"{prefix}R_{i}": layer["R"] for i, layer in enumerate(report["layers"])})
    return out


def calibration_batch(examples: list[dict], tokenizer, samples: int, max_length: int, seed: int = 0) -> dict:
    """`samples` examples drawn with a fixed seed, so every measurement of a run sees the same batch."""
    if not examples or samples < 1:
        raise RlxError(f"no examples to measure quantization robustness on ({len(examples)} in the split, "
                       f"samples={samples})")
    chosen = random.Random(seed).sample(range(len(examples)), min(samples, len(examples)))
    return lm_batch([examples[i] for i in sorted(chosen)], tokenizer, max_length)


# ---------------------------------------------------------------------------- the hook


class RobustnessProbe(Hook):
    """Logs `robustness/...` (see `scalars`) on a fixed validation batch at the end of training,
    and every `every` optimizer steps if `every` > 0."""

    def __init__(self, every: int = 0, bits: int = 4, samples: int = 8, max_length: int = 256,
                 split: str = "validation"):
        if every < 0 or samples < 1 or max_length < 2:
            raise RlxError(f"robustness probe: every={every} must be >= 0, samples={samples} >= 1 and "
                           f"max_length={max_length} >= 2")
        IntN(bits, group_size=0)  # validates bits
        self.every, self.bits, self.samples, self.max_length, self.split = every, bits, samples, max_length, split
        self._measured_at: int | None = None

    def measure(self, state) -> None:
        model = state.model
        batch = calibration_batch(state.task.split(self.split), state.tokenizer, self.samples, self.max_length)
        was_training = model.training
        model.eval()
        try:
            self.metrics.update(scalars(robustness_report(model, batch, self.bits)))
        finally:
            model.train(was_training)
        self._measured_at = state.step

    def on_step_end(self, state) -> None:
        if self.every and state.step % self.every == 0:
            self.measure(state)

    def on_train_end(self, state) -> None:
        if self._measured_at != state.step:  # the last step may already have been measured
            self.measure(state)
