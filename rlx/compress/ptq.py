"""Post-training quantization of a whole model (`rlx quantize`), one decoder block at a time.

For each block in order, calibration batches run through the model up to that block (the forward
stops there), with the blocks before it already quantized, so each layer's Hessian H = Σ x xᵀ is
taken over the inputs it will see after quantization (GPTQ's sequential scheme, block by block:
the linear layers inside one block share one pass). Then every attention/MLP linear layer of the
block is replaced by its quantized weights. Embeddings and the LM head stay as they are. Every
method returns integer codes on per-row grids (`rlx.compress.gptq.Codes`): the model gets their
decoded weights, and the codes go to a sidecar.

Methods (`conf/method/`): `rtn` (round-to-nearest), `gptq`, `baq` (GPTQ with BAQ's per-column
bit-widths at the same average), `hqq` (torchao's HQQ, calibration-free: the peer library). Each reports, per layer, its bits and the relative output error
‖(W − Q) X‖² / ‖W X‖² on the calibration inputs.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from rlx.compress.baq import baq_bits
from rlx.compress.gptq import Codes, gptq, rtn
from rlx.errors import RlxError
from rlx.layers import target_layers


class RTN:
    def __call__(self, w: Tensor, h: Tensor, bits: int, group_size: int, symmetric: bool) -> Codes:
        return rtn(w, bits, group_size, symmetric)


class GPTQ:
    def __init__(self, damp: float = 0.01, act_order: bool = False, block_size: int = 128):
        self.damp, self.act_order, self.block_size = damp, act_order, block_size

    def __call__(self, w, h, bits, group_size, symmetric):
        return gptq(w, h, bits, group_size, symmetric, self.damp, self.act_order, self.block_size)


class BAQ(GPTQ):
    def __init__(self, min_bits: int = 1, max_bits: int = 8, **gptq_options):
        super().__init__(**gptq_options)
        self.min_bits, self.max_bits = min_bits, max_bits

    def __call__(self, w, h, bits, group_size, symmetric):
        return super().__call__(w, h, baq_bits(h, bits, self.min_bits, self.max_bits, self.damp), group_size, symmetric)


class HQQ:
    """HQQ (Badri & Shaji, 2023) through torchao's implementation: a half-quadratic solver fits each
    row's (or group's) scale and zero point to the weights alone; the calibration data only measure
    its error. The grid is asymmetric by construction."""

    def __init__(self, optimize: bool = True):
        self.optimize = optimize

    def __call__(self, w, h, bits, group_size, symmetric):
        from torchao.quantization import quant_primitives

        if symmetric:
            raise RlxError("method=hqq fits an asymmetric grid: symmetric=true does not apply")
        # torchao keeps HQQ under a private name since 0.12 (public before)
        hqq = getattr(quant_primitives, "_choose_qparams_and_quantize_affine_hqq", None) or \
            quant_primitives.choose_qparams_and_quantize_affine_hqq
        size = group_size if group_size > 0 else w.shape[1]
        q, scale, zero, _ = hqq(w, nbits=bits, group_size=size, axis=1, optimize=self.optimize,
                                compute_dtype=torch.float32, device=str(w.device),
                                raw_output=True)  # HQQ's own layout: w = (q - zero) * scale per group, row-major
        rows, cols = w.shape
        return Codes(q.reshape(rows, cols).float(), scale.reshape(rows, -1).float(), zero.reshape(rows, -1).float(),
                     torch.arange(cols) // size, torch.full((cols,), bits))


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: its ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise RlxError(f"{type(model).__name__} has no stack of decoder blocks to quantize")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


class _Stop(Exception):
    """Raised after the block being calibrated: the rest of the forward pass is not needed."""


def _hessians(model: nn.Module, block: nn.Module, layers: dict[str, nn.Module], batches: list[dict]) -> dict:
    hessians = {name: torch.zeros(layer.in_features, layer.in_features) for name, layer in layers.items()}
    mask: list[Tensor] = []

    def record(name):
        def hook(module, args):
            x = args[0][mask[0]].float()  # real tokens only, (tokens, in)
            hessians[name].add_(x.T @ x)
        return hook

    def stop(module, args, output):
        raise _Stop

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    handles.append(block.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for batch in batches:
                mask[:] = [batch["attention_mask"].bool()]
                try:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return hessians


def calibrated_layers(model: nn.Module, batches: list[dict], progress: bool = True, desc: str = "calibrate"):
    """(qualified name, layer, H) for every attention/MLP linear layer, block by block. A block is
    calibrated only when the caller has finished with the blocks before it, so changes made to their
    weights (quantized, pruned) shape the inputs the later layers are calibrated on."""
    from tqdm.auto import tqdm

    for block in tqdm(decoder_blocks(model), desc=desc, disable=None if progress else True):
        layers = {n: m for n, m in target_layers(block).items() if isinstance(m, nn.Linear)}
        prefix = next(n for n, m in model.named_modules() if m is block)
        for name, h in _hessians(model, block, layers, batches).items():
            yield f"{prefix}.{name}", layers[name], h


def relative_error(w: Tensor, new: Tensor, h: Tensor) -> float:
    """‖(W − W') X‖² / ‖W X‖² on the calibration inputs, from H = X Xᵀ."""
    d = w - new
    return (torch.trace(d @ h @ d.T) / torch.trace(w @ h @ w.T).clamp_min(1e-30)).item()


def quantize_model(model: nn.Module, method, batches: list[dict], bits: float, group_size: int = 0,
                   symmetric: bool = False, progress: bool = True) -> tuple[dict, dict[str, Tensor]]:
    """Quantize `model` in place; returns the report (per-layer bits and errors, averages, time) and
    every layer's codes, scales, zero points, grid index per column and bits (`Codes.compact`)."""
    t0 = time.perf_counter()
    layers_report, total_bits, total_weights, packed_bytes, quantized, stored = {}, 0.0, 0, 0.0, set(), {}
    for name, layer, h in calibrated_layers(model, batches, progress, "quantize"):
        w = layer.weight.data.float()
        codes = method(w, h, bits, group_size, symmetric)
        q, col_bits = codes.decode(), codes.bits
        stored.update({f"{name}.{k}": t for k, t in codes.compact().items()})
        error = relative_error(w, q, h)
        layer.weight.data.copy_(q.to(layer.weight.dtype))
        quantized.add(id(layer.weight))
        col_bits = col_bits.float()
        layers_report[name] = {"bits": col_bits.mean().item(), "min_bits": col_bits.min().item(),
                               "max_bits": col_bits.max().item(), "relative_error": error}
        total_bits += col_bits.sum().item() * w.shape[0]
        total_weights += w.numel()
        packed_bytes += col_bits.sum().item() * w.shape[0] / 8 + codes.scale.numel() * 4  # fp16 scale and zero per grid
    errors = [r["relative_error"] for r in layers_report.values()]
    other = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    return {"average_bits": total_bits / max(total_weights, 1), "quantized_weights": total_weights,
            # the size stored at these bits with fp16 grid parameters, the other weights in 16 bits
            "packed_MB": (packed_bytes + 2 * other) / 2**20,
            "mean_relative_error": sum(errors) / max(len(errors), 1), "time_s": time.perf_counter() - t0,
            "layers": layers_report}, stored
