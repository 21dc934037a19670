"""What `rlx quantize` and `rlx prune` run: build the model (or load `checkpoint`), calibrate on the
task's training examples, compress block by block, save a checkpoint transformers loads, evaluate.

The method is an option of the command's own config group (conf/quantize/method/ or
conf/prune/method/), so a prune method given to `rlx quantize` is Hydra's unknown-option error.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rlx.config import build, group_options, require_complete
from rlx.errors import RlxError
from rlx.paths import CONF_DIR
from rlx.seeding import seed_everything
from rlx.tracking import print_summary


def run_quantize(cfg: DictConfig, run_dir: Path) -> dict:
    """Quantize the model (or `cfg.checkpoint`) into `run_dir/model` (+ `quantization.json`) and evaluate it."""
    require_complete(cfg)
    if not 1 <= cfg.bits <= 16:
        raise RlxError(f"bits={cfg.bits} must lie in 1..16")
    return _compress(cfg, run_dir, "quantize")


def run_prune(cfg: DictConfig, run_dir: Path) -> dict:
    """Prune the model (or `cfg.checkpoint`) into `run_dir/model` (+ `pruning.json`) and evaluate it."""
    require_complete(cfg)
    if cfg.n_m is None and not 0 <= cfg.sparsity < 1:
        raise RlxError(f"sparsity={cfg.sparsity} must lie in [0, 1)")
    if cfg.n_m is not None and (len(cfg.n_m) != 2 or not 0 < cfg.n_m[0] <= cfg.n_m[1]):
        raise RlxError(f"n_m={list(cfg.n_m)}: give [N, M] with 0 < N <= M, e.g. [2, 4]")
    return _compress(cfg, run_dir, "prune")


def _compress(cfg: DictConfig, run_dir: Path, kind: str) -> dict:
    from rlx.compress.prune import prune_model
    from rlx.compress.ptq import quantize_model
    from rlx.data.collate import lm_batch
    from rlx.evaluate import evaluate, perplexity
    from rlx.models import hf
    from rlx.state import find_checkpoint

    if cfg.calib.samples < 1:
        raise RlxError("calib.samples must be >= 1: the methods calibrate on it (GPTQ, BAQ, Wanda) and every one "
                       "reports its error on it")
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    method = build(cfg.method)
    policy = hf(str(find_checkpoint(cfg.checkpoint)), dtype="float32", device="auto") if cfg.checkpoint \
        else build(cfg.model)
    task = build(cfg.data)
    general = general_task(cfg.calib.get("general"))
    device = policy.model.device

    def batches_of(source, name: str) -> list[dict]:
        examples = source.split("train")[: cfg.calib.samples]
        if not examples:
            raise RlxError(f"{name} has no training examples to calibrate on")
        return [{k: v.to(device) for k, v in lm_batch(examples[i:i + cfg.calib.batch_size], policy.tokenizer,
                                                       cfg.calib.max_length).items()}
                for i in range(0, len(examples), cfg.calib.batch_size)]

    batches = batches_of(task, cfg.data._target_)
    policy.model.eval()
    if kind == "quantize":
        report, codes = quantize_model(policy.model, method, batches, cfg.bits, cfg.group_size, cfg.symmetric,
                                       cfg.progress)
        report = {"method": cfg.method._target_, "bits": cfg.bits, "group_size": cfg.group_size,
                  "symmetric": cfg.symmetric, **report}
        head = {"average_bits": report["average_bits"], "packed_MB": report["packed_MB"]}
    else:
        n_m = tuple(cfg.n_m) if cfg.n_m is not None else None
        report = prune_model(policy.model, method, batches, cfg.sparsity, n_m, cfg.progress,
                             general=batches_of(general, cfg.calib.general) if general is not None else None)
        report = {"method": cfg.method._target_, "requested_sparsity": cfg.sparsity, "n_m": cfg.n_m and list(n_m),
                  **report}
        head = {"sparsity": report["sparsity"]}
    out = run_dir / "model"
    policy.model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
    (out / ("quantization.json" if kind == "quantize" else "pruning.json")).write_text(json.dumps(report, indent=1) + "\n")
    if kind == "quantize":  # the integer form beside the dequantized checkpoint
        from safetensors.torch import save_file

        save_file({k: t.contiguous() for k, t in codes.items()}, str(out / "quantization.safetensors"),
                  metadata={"decode": "weight[:, j] = scale[:, grid[j]] * (codes[:, j] - zero[:, grid[j]])"})
    summary = {"model_dir": str(out), **head, "mean_relative_error": report["mean_relative_error"],
               f"{kind}_s": report["time_s"]}
    if cfg.eval.samples:
        summary.update(evaluate(policy.model, policy.tokenizer, task, cfg.eval.split, cfg.eval.samples,
                                cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.max_length))
        if general is not None:  # what the compression cost the model outside the task
            held_out = general.split(cfg.eval.split)[: cfg.eval.samples]
            summary.update({k.replace("eval/", "general/"): v for k, v in perplexity(
                policy.model, policy.tokenizer, held_out, cfg.eval.batch_size, cfg.eval.max_length).items()})
    summary["wall_time_s"] = time.perf_counter() - t_start
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        summary = {"overrides": HydraConfig.get().job.override_dirname, **summary}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_summary(summary, title=f"rlx {kind}")
    return summary


def general_task(name: str | None):
    """The open-domain set `calib.general` names (an option of the data group), or None."""
    if name is None:
        return None
    if name not in group_options("data"):
        raise RlxError(f"calib.general={name} is not a data config; options: {', '.join(group_options('data'))}")
    return build(OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml"))
