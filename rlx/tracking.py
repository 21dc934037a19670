"""Where metrics go: `metrics.jsonl` in the run folder always, wandb when `logger=wandb`,
a one-screen summary at the end of a run and a table at the end of a sweep.

Metric keys are namespaced (`train/loss`, `eval/accuracy`) and identical across algorithms.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def _plain(metrics: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}


class JsonlLogger:
    """One JSON object per logged step in `run_dir/metrics.jsonl`, appended and flushed."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a")

    def log_config(self, config: DictConfig) -> None:
        """Hydra already saved the config in `.hydra/`; remote backends record it here."""

    def log(self, metrics: dict, step: int) -> None:
        self._file.write(json.dumps({"step": step, **_plain(metrics)}) + "\n")
        self._file.flush()

    def summary(self, summary: dict) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(_plain(summary), indent=2) + "\n")

    def finish(self) -> None:
        self._file.close()


class NullLogger:
    """What ranks other than 0 log to under data parallelism: nothing."""

    def log_config(self, config: DictConfig) -> None: ...
    def log(self, metrics: dict, step: int) -> None: ...
    def summary(self, summary: dict) -> None: ...
    def finish(self) -> None: ...


class WandbLogger(JsonlLogger):
    """The same metrics through wandb. `mode: auto` is online when WANDB_API_KEY is set, else
    offline (a real run folder under `run_dir/wandb` that `wandb sync` uploads later). Jobs of
    one Hydra sweep share a `group`, so a multirun shows as one comparison."""

    def __init__(self, run_dir, project: str = "rlx", entity: str | None = None,
                 mode: str = "auto", group: str | None = None, tags: list | None = None):
        super().__init__(run_dir)
        import wandb

        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        name, group = _hydra_job_names(group)
        self.run = wandb.init(
            project=project, entity=entity, mode=mode, group=group, name=name, tags=list(tags or []),
            dir=str(self.run_dir), reinit="finish_previous",
        )

    def log_config(self, config: DictConfig) -> None:
        self.run.config.update(OmegaConf.to_container(config, resolve=True))

    def log(self, metrics: dict, step: int) -> None:
        super().log(metrics, step)
        self.run.log(_plain(metrics), step=step)

    def summary(self, summary: dict) -> None:
        super().summary(summary)
        self.run.summary.update(_plain(summary))

    def finish(self) -> None:
        super().finish()
        self.run.finish()  # sweep jobs share a process: an unfinished run would swallow the next


def _hydra_job_names(group: str | None) -> tuple[str | None, str | None]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, group
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return hc.job.override_dirname or f"job{hc.job.num}", group or Path(hc.sweep.dir).name
    return None, group


# ---------------------------------------------------------------------------- summaries


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def print_summary(summary: dict, title: str = "rlx run") -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in _plain(summary).items():
        table.add_row(k, _fmt(v))
    console.print(table)


SWEEP_COLUMNS = ("train/loss", "average_bits", "sparsity", "mean_relative_error", "eval/loss", "eval/accuracy", "eval/response_len", "general/perplexity",
                 "train/tokens_per_s", "wall_time_s")


class SweepSummary(Callback):
    """Hydra callback: after a multirun, one row per job from each job's summary.json. The
    screen shows the swept values and the headline metrics; `<sweep dir>/summary.csv` has all."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = sorted((p for p in sweep.glob("*/summary.json")), key=lambda p: p.parent.name.zfill(6))
        rows = [{"job": f.parent.name, **json.loads(f.read_text())} for f in jobs]
        if not rows:
            return
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines = [",".join(keys)] + [",".join(json.dumps(r.get(k, "")) for k in keys) for r in rows]
        (sweep / "summary.csv").write_text("\n".join(lines) + "\n")

        settings = [dict(kv.split("=", 1) for kv in r.get("overrides", "").split(",") if "=" in kv) for r in rows]
        swept = [k for k in dict.fromkeys(k for s in settings for k in s) if len({s.get(k) for s in settings}) > 1]
        table = Table(title=f"sweep {sweep}", title_justify="left")
        columns = ["job", *swept, *(k for k in SWEEP_COLUMNS if k in keys)]
        for c in columns:
            table.add_column(c)
        for r, s in zip(rows, settings):
            table.add_row(*[_fmt(s.get(c, r.get(c, ""))) for c in columns])
        console.print(table)
