"""The `rlx` command. Typer routes, Hydra runs: `train` hands its arguments untouched to a
`@hydra.main` task (so overrides, -m multirun, sweepers, launchers and --cfg all work);
`ls`, `config show` and `eval` compose configs directly; `plot` and `merge` work on run folders.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import typer
from omegaconf import OmegaConf

from rlx.config import ALL_GROUPS, build, check_overrides, compose_config, group_options
from rlx.errors import RlxError

PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
START = """Start here (2 CPU cores; the first RL, preference or compression run builds the SFT base once, ~5 min):

```
rlx train algo=tppo                        T-PPO from the SFT base, 100 steps (~3.5 min): rewards, accuracy, lengths
rlx quantize method=baq bits=3             BAQ at 3 bits (~15 s): bits per layer, output error, accuracy after
rlx train -m optimizer=adamw,frugal,fira   a Hydra sweep, one run per optimizer, a table at the end
                                           (add trainer.max_steps=200: ~2 min a job)
rlx train logger=wandb algo=dler           the same metrics on a wandb dashboard (offline unless you log in)
```

Overrides are Hydra's: key=value, group=option; `rlx ls` lists every config group's options."""

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown",
                  help="rlx: one training loop, Hydra config groups, hooks.", epilog=START)
config_app = typer.Typer(no_args_is_help=True, help="Inspect composed configs.")
app.add_typer(config_app, name="config")


def _fail(e: RlxError) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


def run_hydra_task(task: Callable, name: str, args: list[str]) -> None:
    """Check the overrides, then call a `@hydra.main` task as if from the shell with `args`.
    Hydra reads sys.argv only (hydra#2459), so it is swapped here and always restored, and
    the finished job's HydraConfig is dropped so later in-process code does not see it."""
    from hydra.core.hydra_config import HydraConfig

    modes = [a for a in args if a in ("-m", "--multirun", "-c", "--cfg", "-i", "--info", "--run")]
    if len(modes) > 1:
        _fail(RlxError(f"{' and '.join(modes)} cannot go together: --cfg and --info show the config a single "
                       "run would use"))
    try:
        check_overrides(name, [a for a in args if "=" in a and not a.startswith("-")])
    except RlxError as e:
        _fail(e)
    saved = sys.argv
    sys.argv = [f"rlx {name}", *args]
    try:
        task()
    finally:
        sys.argv = saved
        HydraConfig.instance().cfg = None


@app.command(context_settings=PASSTHROUGH)
def train(ctx: typer.Context) -> None:
    """Train: rlx train [-m] algo=sft optimizer.lr=3e-4 trainer.max_steps=200 (`rlx train -- --help` for Hydra's help)."""
    from rlx.distributed import torchrun_overrides
    from rlx.tasks import train_task

    try:
        args = torchrun_overrides(ctx.args)  # under torchrun: one run folder for all ranks
    except RlxError as e:
        _fail(e)
    run_hydra_task(train_task, "train", args)


@app.command(context_settings=PASSTHROUGH)
def quantize(ctx: typer.Context) -> None:
    """Post-training quantization: rlx quantize [-m] method=gptq|baq|rtn bits=3 [checkpoint=PATH]."""
    from rlx.tasks import quantize_task

    run_hydra_task(quantize_task, "quantize", ctx.args)


@app.command(context_settings=PASSTHROUGH)
def prune(ctx: typer.Context) -> None:
    """Pruning: rlx prune [-m] method=wanda|magnitude sparsity=0.5 [n_m=[2,4]] [checkpoint=PATH]."""
    from rlx.tasks import prune_task

    run_hydra_task(prune_task, "prune", ctx.args)


@app.command(context_settings=PASSTHROUGH, name="eval")
def eval_(ctx: typer.Context) -> None:
    """Evaluate a checkpoint or a model: rlx eval checkpoint=outputs/.../last [split=test data=...]."""
    from rlx.evaluate import evaluate
    from rlx.tracking import print_summary

    try:
        cfg = _eval_config(ctx.args)
        policy, task = build(cfg.model), build(cfg.data)
        metrics = evaluate(policy.model, policy.tokenizer, task, cfg.split, cfg.num_samples,
                           cfg.batch_size, cfg.max_new_tokens, cfg.max_length)
    except RlxError as e:
        _fail(e)
    summary = {"model": cfg.checkpoint or cfg.model._target_, "data": cfg.data._target_, "split": cfg.split, **metrics}
    print_summary(summary, title="rlx eval")
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(summary, indent=2) + "\n")


def _eval_config(args: list[str]):
    """conf/eval.yaml; with `checkpoint=`, the model is that checkpoint and, unless `data` is
    overridden, the data set is the one it was trained on."""
    from rlx.state import find_checkpoint

    cfg = compose_config("eval", args)
    if cfg.checkpoint:
        ckpt = find_checkpoint(cfg.checkpoint)
        cfg.model = {"_target_": "rlx.models.hf", "name_or_path": str(ckpt), "dtype": "float32", "device": cfg.device}
        saved = ckpt / "rlx_config.yaml"
        if saved.exists() and not any(a.split("=")[0].lstrip("+").startswith("data") for a in args):
            cfg.data = OmegaConf.load(saved).data
    return cfg


@app.command()
def ls(group: str = typer.Argument(None, help=f"one of: {', '.join(ALL_GROUPS)}")) -> None:
    """List the options of a config group (or every group)."""
    try:
        for g in [group] if group else ALL_GROUPS:
            typer.echo(f"{g}: {' '.join(group_options(g))}")
    except RlxError as e:
        _fail(e)


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="run folders (each with metrics.jsonl)"),
    keys: str = typer.Option(None, help="comma-separated metrics, e.g. train/loss,eval/accuracy"),
    out: Path = typer.Option(Path("curves.png"), help="the PNG to write"),
) -> None:
    """Plot training curves of one or more runs into a PNG."""
    from rlx.plots import plot_runs

    try:
        typer.echo(f"wrote {plot_runs(runs, keys.split(',') if keys else None, out)}")
    except RlxError as e:
        _fail(e)


@app.command()
def merge(
    base: Path = typer.Argument(..., help="the model before RL: a checkpoint, checkpoints/ or run folder"),
    tuned: Path = typer.Argument(..., help="the model after RL (e.g. algo=dler), same architecture"),
    out: Path = typer.Argument(..., help="the folder to write the merged checkpoint to"),
    keep: float = typer.Option(0.25, help="fraction of each tensor's largest-magnitude updates kept"),
    scale: float = typer.Option(0.7, help="factor on the kept updates"),
) -> None:
    """DLER's update-selective merge: base + scale * (the top `keep` of each tensor's update)."""
    from rlx.merge import merge_checkpoints

    try:
        typer.echo(f"wrote {merge_checkpoints(base, tuned, out, keep, scale)}")
    except RlxError as e:
        _fail(e)


@config_app.command("show", context_settings=PASSTHROUGH)
def config_show(ctx: typer.Context) -> None:
    """Print the composed train config as YAML: rlx config show algo=sft optimizer.lr=3e-4."""
    try:
        cfg = compose_config("train", ctx.args)
        from rlx.config import validate

        validate(cfg)
    except RlxError as e:
        _fail(e)
    typer.echo(OmegaConf.to_yaml(cfg))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
