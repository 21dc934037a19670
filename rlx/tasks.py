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
from rlx.compress.run import run_prune, run_quantize
from rlx.config import build, require_complete
from rlx.distributed import Parallel, check_shardable
from rlx.errors import RlxError
from rlx.hooks import HookList
from rlx.loop import TrainerConfig, make_scheduler, train
from rlx.paths import CONF_DIR
from rlx.seeding import seed_everything
from rlx.state import TrainState
from rlx.tracking import NullLogger, print_summary


def run_training(cfg: DictConfig, run_dir: Path) -> dict:
    """Build every component from `cfg`, train, log, and return the final metrics."""
    require_complete(cfg)
    trainer_cfg = TrainerConfig.from_config(cfg.trainer)
    parallel = Parallel.start(trainer_cfg.strategy)
    try:
        return _run_training(cfg, run_dir, trainer_cfg, parallel)
    finally:
        parallel.close()


def _run_training(cfg: DictConfig, run_dir: Path, trainer_cfg: TrainerConfig, parallel: Parallel) -> dict:
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    policy = build(cfg.model)
    task = build(cfg.data)
    if cfg.get("weighting") and "weighting" not in cfg.algo:
        raise RlxError(f"weighting={cfg.weighting.get('_target_', '?').rsplit('.', 1)[-1]} weighs the samples of "
                       "algo=sft; it has no meaning for this algorithm")
    if cfg.get("rollout") and "engine" not in cfg.algo:
        raise RlxError(f"rollout={cfg.rollout.get('_target_', '?').rsplit('.', 1)[-1]} samples the responses of an "
                       "RL algorithm that takes an engine (algo=grpo); this algorithm samples with rlx's own sampler")
    algo = build(cfg.algo)
    if cfg.get("regularizer"):  # wraps the algorithm: same batches, a regularized loss
        algo = build(cfg.regularizer, algo=algo)
    if not isinstance(algo, Algorithm):
        raise RlxError(f"algo {cfg.algo.get('_target_')} lacks a member of the algorithm contract "
                       "(make_batch, loss, param_groups, state_dict, load_state_dict, needs_trained_model: "
                       "rlx/algorithms/__init__.py)")
    if policy.random_init and algo.needs_trained_model:
        print(f"note: {cfg.model._target_} is a random init that cannot do the task yet, so {type(algo).__name__} "
              "has nothing to refine: start from the SFT base with model=tiny_sft (built on first use)",
              file=sys.stderr)
    # Named parameters (torch keeps the names in each group's `param_names`), so optimizers that
    # treat layers differently (FRUGAL keeps embeddings and norms state-full) can tell them apart.
    parallel.prepare(policy.model)  # DDP / FSDP2 in place, before the optimizer sees the parameters
    groups = [{"params": [(n, p) for n, p in policy.model.named_parameters() if p.requires_grad]},
              *algo.param_groups()]  # what an algorithm trains beside the policy (PPO's critic)
    params = [p for g in groups for _, p in g["params"]]
    try:  # `_partial_` optimizers meet their parameters (and any bad values) only here
        optimizer = build(cfg.optimizer)(groups)
    except (TypeError, ValueError) as e:
        raise RlxError(f"cannot build optimizer {cfg.optimizer.get('_target_')}: {e}") from None
    state = TrainState(policy.model, policy.tokenizer, optimizer, make_scheduler(optimizer, trainer_cfg), task,
                       run_dir=run_dir, trainer=trainer_cfg, parallel=parallel)
    hooks = HookList({"quantizer": build(cfg.quantizer), **{name: build(h) for name, h in cfg.hooks.items()}})
    if parallel.strategy == "fsdp2":
        check_shardable(optimizer, hooks.named, algo.param_groups(), type(algo).__name__)
    logger = build(cfg.logger, run_dir=run_dir) if parallel.is_main else NullLogger()  # rank 0 alone writes
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
        if parallel.is_main:
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
