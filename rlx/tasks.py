"""The `@hydra.main` task functions behind the run-type commands, and the code they run.

`train_task` is what `rlx train ...` hands its overrides to; `run_training(cfg, run_dir)`
is the same run without Hydra's machinery, for tests and notebooks.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlx.algorithms import Algorithm
from rlx.config import build
from rlx.errors import RlxError
from rlx.hooks import HookList
from rlx.loop import TrainerConfig, make_scheduler, train
from rlx.paths import CONF_DIR
from rlx.seeding import seed_everything
from rlx.state import TrainState
from rlx.tracking import print_summary


def run_training(cfg: DictConfig, run_dir: Path) -> dict:
    """Build every component from `cfg`, train, log, and return the final metrics."""
    trainer_cfg = TrainerConfig.from_config(cfg.trainer)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    policy = build(cfg.model)
    task = build(cfg.data)
    algo = build(cfg.algo)
    if not isinstance(algo, Algorithm):
        raise RlxError(f"algo {cfg.algo.get('_target_')} lacks a method of the algorithm contract "
                       "(make_batch, loss, param_groups, state_dict, load_state_dict: rlx/algorithms/__init__.py)")
    # Named parameters (torch keeps the names in each group's `param_names`), so optimizers that
    # treat layers differently (FRUGAL keeps embeddings and norms state-full) can tell them apart.
    groups = [{"params": [(n, p) for n, p in policy.model.named_parameters() if p.requires_grad]},
              *algo.param_groups()]  # what an algorithm trains beside the policy (PPO's critic)
    params = [p for g in groups for _, p in g["params"]]
    try:  # `_partial_` optimizers meet their parameters (and any bad values) only here
        optimizer = build(cfg.optimizer)(groups)
    except (TypeError, ValueError) as e:
        raise RlxError(f"cannot build optimizer {cfg.optimizer.get('_target_')}: {e}") from None
    state = TrainState(policy.model, policy.tokenizer, optimizer, make_scheduler(optimizer, trainer_cfg), task,
                       run_dir=run_dir, trainer=trainer_cfg)
    hooks = HookList({"quantizer": build(cfg.quantizer), **{name: build(h) for name, h in cfg.hooks.items()}})
    logger = build(cfg.logger, run_dir=run_dir)
    logger.log_config(cfg)
    try:
        final = train(state, algo, hooks, logger, seed=cfg.seed, config=cfg)
        summary = {
            "run_dir": str(run_dir),
            "params_M": sum(p.numel() for p in params) / 1e6,
            **final,
            "wall_time_s": time.perf_counter() - t_start,
        }
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            summary = {"overrides": HydraConfig.get().job.override_dirname, **summary}
        logger.summary(summary)
        print_summary(summary)
        return summary
    finally:
        logger.finish()
        del state, policy
        if torch.cuda.is_available():  # sweep jobs share one process
            torch.cuda.empty_cache()


def sweep_metric(summary: dict) -> float:
    """What an optimizing sweeper maximizes: accuracy where there is one, else -loss."""
    if "eval/accuracy" in summary:
        return float(summary["eval/accuracy"])
    return -float(summary.get("eval/loss", summary.get("train/loss", float("inf"))))


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def train_task(cfg: DictConfig) -> float:
    try:
        summary = run_training(cfg, Path(HydraConfig.get().runtime.output_dir))
    except RlxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return sweep_metric(summary)


# ---------------------------------------------------------------------------- rlx quantize, rlx prune


def run_quantize(cfg: DictConfig, run_dir: Path) -> dict:
    """Quantize the model (or `cfg.checkpoint`) into `run_dir/model` (+ `quantization.json`) and evaluate it."""
    if not 1 <= cfg.bits <= 16:
        raise RlxError(f"bits={cfg.bits} must lie in 1..16")
    return _compress(cfg, run_dir, "quantize")


def run_prune(cfg: DictConfig, run_dir: Path) -> dict:
    """Prune the model (or `cfg.checkpoint`) into `run_dir/model` (+ `pruning.json`) and evaluate it."""
    if cfg.n_m is None and not 0 <= cfg.sparsity < 1:
        raise RlxError(f"sparsity={cfg.sparsity} must lie in [0, 1)")
    if cfg.n_m is not None and (len(cfg.n_m) != 2 or not 0 < cfg.n_m[0] <= cfg.n_m[1]):
        raise RlxError(f"n_m={list(cfg.n_m)}: give [N, M] with 0 < N <= M, e.g. [2, 4]")
    return _compress(cfg, run_dir, "prune")


def _compress(cfg: DictConfig, run_dir: Path, kind: str) -> dict:
    import json

    from rlx.data.collate import lm_batch
    from rlx.evaluate import evaluate, perplexity
    from rlx.models import hf
    from rlx.quant.dpruner import DPruner
    from rlx.quant.prune import Magnitude, Wanda, prune_model
    from rlx.quant.ptq import GPTQ, HQQ, RTN, quantize_model
    from rlx.state import find_checkpoint

    if cfg.calib.samples < 1:
        raise RlxError("calib.samples must be >= 1: the methods calibrate on it (GPTQ, BAQ, Wanda) and every one "
                       "reports its error on it")
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    method = build(cfg.method)
    fits = {"quantize": (RTN, GPTQ, HQQ), "prune": (Magnitude, Wanda, DPruner)}
    if not isinstance(method, fits[kind]):
        other = "prune" if kind == "quantize" else "quantize"
        raise RlxError(f"method {cfg.method._target_} is for rlx {other}, not rlx {kind}")
    policy = hf(str(find_checkpoint(cfg.checkpoint)), dtype="float32", device="auto") if cfg.checkpoint \
        else build(cfg.model)
    task = build(cfg.data)
    general = _general_task(cfg.calib.get("general"))
    if hasattr(method, "scores") and general is None:  # whole-model scorers (D-Pruner) need the open-domain set
        raise RlxError("method=dpruner needs an open-domain calibration set besides the domain task: add "
                       "calib.general=shakespeare (any option of the data group)")
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


def _general_task(name: str | None):
    """The open-domain calibration set `calib.general` names: an option of the data group."""
    from omegaconf import OmegaConf

    from rlx.config import group_options

    if name is None:
        return None
    if name not in group_options("data"):
        raise RlxError(f"calib.general={name} is not a data config; options: {', '.join(group_options('data'))}")
    return build(OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml"))


def _compression_task(run, cfg: DictConfig) -> float:
    try:
        summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except RlxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return -float(summary["mean_relative_error"])


@hydra.main(config_path=str(CONF_DIR), config_name="quantize", version_base="1.3")
def quantize_task(cfg: DictConfig) -> float:
    return _compression_task(run_quantize, cfg)


@hydra.main(config_path=str(CONF_DIR), config_name="prune", version_base="1.3")
def prune_task(cfg: DictConfig) -> float:
    return _compression_task(run_prune, cfg)
