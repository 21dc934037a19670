"""`rlx merge`: write DLER's update-selective merge of two checkpoints as a new checkpoint.

`merge_updates` is the math (DLER's update-selective merging; see `rlx.algorithms.dler`); the
rest reads the two checkpoints' safetensors, merges file by file (so sharded checkpoints keep their index), copies the tuned
checkpoint's config and tokenizer, and writes everything under a temporary name that is renamed
into place only when complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rlx.errors import RlxError
from rlx.state import find_checkpoint

SKIPPED = {"trainer_state.pt"}  # optimizer and data state belong to the run, not to the merged model


def merge_updates(base: dict[str, Tensor], tuned: dict[str, Tensor], keep: float = 0.25,
                  scale: float = 0.7) -> dict[str, Tensor]:
    """theta_base + scale * (Delta where |Delta| is among each tensor's top `keep` fraction).

    Ties at the threshold are kept whole, so a tensor keeps at least ceil(keep * numel) entries;
    `keep=1, scale=1` returns `tuned`, `keep=0` returns `base`."""
    if not 0.0 <= keep <= 1.0:
        raise RlxError(f"merge keep={keep} must be a fraction in [0, 1]")
    if set(base) != set(tuned):
        raise RlxError("the two models have different parameters: merge checkpoints of the same architecture")
    merged = {}
    for name, b in base.items():
        t = tuned[name]
        if t.shape != b.shape:
            raise RlxError(f"parameter {name} has shape {tuple(t.shape)} in one model and {tuple(b.shape)} in the other")
        if not b.is_floating_point():
            merged[name] = t.clone()
            continue
        delta = t.float() - b.float()
        k = int(torch.ceil(torch.tensor(keep * delta.numel())).item())
        if k == 0:
            merged[name] = b.clone()
            continue
        threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
        selected = delta * (delta.abs() >= threshold)
        merged[name] = (b.float() + scale * selected).to(b.dtype)
    return merged


def _weights(folder: Path) -> dict[str, dict]:
    if (folder / "adapter_config.json").exists():
        raise RlxError(f"{folder} is a LoRA adapter: merge full checkpoints (merge the adapter into its model first)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RlxError(f"checkpoint {folder} holds no .safetensors weights")
    return {f.name: load_file(f) for f in files}


def merge_checkpoints(base: str | Path, tuned: str | Path, out: str | Path, keep: float = 0.25,
                      scale: float = 0.7) -> Path:
    base_dir, tuned_dir, out = find_checkpoint(base), find_checkpoint(tuned), Path(out)
    base_weights, tuned_weights = _weights(base_dir), _weights(tuned_dir)
    flat_base = {k: v for shard in base_weights.values() for k, v in shard.items()}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, shard in tuned_weights.items():
        if set(shard) - set(flat_base):
            raise RlxError(f"the base checkpoint lacks {sorted(set(shard) - set(flat_base))[:3]}: not the same model")
        save_file(merge_updates({k: flat_base[k] for k in shard}, shard, keep, scale), tmp / name,
                  metadata={"format": "pt"})
    for f in tuned_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in SKIPPED:
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
