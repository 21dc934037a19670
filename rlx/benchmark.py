"""The harness every scripts/bench_*.py runs through: one command line, one writer of results.

A benchmark declares its runs as data (name -> config overrides), measures them, and hands a
`render(result) -> markdown` (and optionally a `plot(result)`) to `Bench.main`:

    RUNS = {"magnitude": ["method=magnitude"], "wanda": ["method=wanda"]}
    bench = Bench(__doc__, "## Domain pruning (bench_dpruner)", runs=RUNS)  # -> results/bench_dpruner.json

    def measure(args) -> dict:  # sweep records after every run: nothing is lost if stopped
        run = lambda name: {"run": name, **keep(compressed("prune", RUNS[name]), KEEP)}
        return bench.sweep(run, args.runs, ("run",), bench.load().get("runs", []))

    if __name__ == "__main__":
        bench.main(measure, render, plot)

Every benchmark takes the same flags:

    --quick     a smoke test: the benchmark's small settings, written under outputs/bench-quick/
                (results/<name>.json, RESULTS.md, plots), never over the published results
    --report    measure nothing: re-render the RESULTS.md section (and plots) from the JSON
    --out DIR   where results/<name>.json, RESULTS.md and the plots go (default docs/)
    --runs ...  a subset of the declared runs, where the benchmark declares them

`record` is the one writer of `<out>/results/<name>.json` (with the command, date and machine),
`publish` of the benchmark's `## ` section of `<out>/RESULTS.md`; `metric` is how a benchmark reads
a metric, from a run's summary, a kept record or a run folder's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
QUICK = ROOT / "outputs" / "bench-quick"
NAN = float("nan")


# ---------------------------------------------------------------------------- metrics


def metric(source, key: str, default=NAN, *, steps: bool = False):
    """Read `key`. From a mapping (a run's summary, a kept record): its value, `eval/perplexity`
    derived from `eval/loss` where only the loss was kept, else `default`. From a run folder or
    its metrics.jsonl rows: every logged value in step order, as (step, value) pairs with `steps`."""
    if isinstance(source, Mapping):
        if key in source:
            return source[key]
        if key == "eval/perplexity" and "eval/loss" in source:
            return math.exp(min(source["eval/loss"], 50.0))
        return default
    rows = read_rows(source) if isinstance(source, (str, Path)) else source
    return [(r["step"], r[key]) if steps else r[key] for r in rows if key in r]


def read_rows(run_dir: str | Path) -> list[dict]:
    """A run folder's metrics.jsonl, one dict per logged step."""
    from rlx.plots import read_metrics

    return read_metrics(Path(run_dir))


def keep(summary: Mapping, keys) -> dict:
    """The metrics among `keys` that `summary` has (for a kept record)."""
    return {k: summary[k] for k in keys if k in summary}


def upsert(records: list[dict], new: dict, *key: str) -> list[dict]:
    """`records` with `new` in place of an earlier record of the same `key` fields (appended)."""
    same = lambda r: all(r.get(k) == new.get(k) for k in key)
    return [r for r in records if not same(r)] + [new]


# ---------------------------------------------------------------------------- runs


@dataclass
class Trained:
    """A finished `rlx train` run in a temporary folder (gone after the `with` block)."""

    dir: Path
    summary: dict

    @cached_property
    def rows(self) -> list[dict]:
        return read_rows(self.dir)

    def policy(self):
        """The final checkpoint, in float32 on the CPU."""
        from rlx.models import hf
        from rlx.state import find_checkpoint

        return hf(str(find_checkpoint(self.dir)), dtype="float32", device="cpu")


@contextlib.contextmanager
def trained(overrides: list[str], quiet: bool = False):
    """`rlx train <overrides>` into a temporary folder; `quiet` swallows its summary table (stderr)."""
    from rlx.config import compose_config
    from rlx.tasks import run_training

    cfg = compose_config("train", list(overrides))
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stderr(open(os.devnull, "w")) if quiet else contextlib.nullcontext():
            summary = run_training(cfg, Path(tmp))
        yield Trained(Path(tmp), summary)


def compressed(kind: str, overrides: list[str]) -> dict:
    """`rlx quantize` or `rlx prune` (`kind`) with `overrides` into a temporary folder: its summary."""
    from rlx.compress.run import run_prune, run_quantize
    from rlx.config import compose_config

    with tempfile.TemporaryDirectory() as tmp:
        return {"quantize": run_quantize, "prune": run_prune}[kind](compose_config(kind, list(overrides)), Path(tmp))


# ---------------------------------------------------------------------------- timing


@contextlib.contextmanager
def time_calls(owner, name: str, spent: list[float]):
    """Wrap `owner.name` (a module's function, an object's method) while the block runs, so that the
    seconds of each call add up in `spent`; rlx and the peers are not edited."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    setattr(owner, name, timed)
    try:
        yield spent
    finally:
        setattr(owner, name, original)


def interleaved(names, repeats: int):
    """(repeat, name) for `repeats` rounds of every name, the order rotating each round (a, b, c; b, c,
    a; ...; two names alternate), so that no side always goes first and a slower spell of the machine
    hits all alike."""
    names = list(names)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            yield r, name


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class OtherCpu:
    """Cores used by other processes while the block runs: machine busy time minus this process's
    CPU time, over the wall time. Near 0 on a quiet machine; ~1 when another job holds a core,
    which on 2 cores slows a 2-thread torch run many times over."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_s(), time.process_time()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        self.cores = max(0.0, (busy_cpu_s() - self.busy0) - (time.process_time() - self.own0)) / wall
        return False


def wait_for_quiet(max_wait_s: float, threshold: float) -> float:
    """Poll until other processes use less than `threshold` cores (2 s samples) or `max_wait_s` passes."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        with OtherCpu() as other:
            time.sleep(2.0)
        if other.cores < threshold or time.perf_counter() > deadline:
            return other.cores
        print(f"  another process uses {other.cores:.1f} cores; waiting", flush=True)


def quiet_run(run: Callable[[], dict], quiet: float, retries: int, max_wait: float, rejected: list[dict],
              before: Callable[[], None] = lambda: None) -> dict:
    """`run()` on a quiet machine: wait up to `max_wait` s for other processes to use less than `quiet`
    cores, and rerun (up to `retries` times) a run during which they took more; the disturbed results
    go to `rejected`. The result gets `other_cores`, what other processes used during it."""
    for attempt in range(retries + 1):
        wait_for_quiet(max_wait, quiet)
        before()
        with OtherCpu() as other:
            result = run()
        result["other_cores"] = other.cores
        if other.cores < quiet or attempt == retries:
            return result
        print(f"  other processes took {other.cores:.1f} cores during the run: rerunning", flush=True)
        rejected.append(result)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- provenance


def machine(**extra) -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **extra,
    }


def machine_line(m: dict, *, threads: bool = False, python: bool = False, libs=("torch",)) -> str:
    """'AMD EPYC, 2 CPUs, cpu; torch 2.13.0+cpu', the form the RESULTS.md footers use."""
    where = [m["cpu"], f"{m['cpu_count']} CPUs", *([f"{m['torch_threads']} torch threads"] if threads else []),
             m["device"]]
    versions = [*([f"Python {m['python']}"] if python else []), *(f"{lib} {m[lib]}" for lib in libs)]
    return ", ".join(where) + "; " + ", ".join(versions)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command() -> str:
    """How this process was started, as the results quote it: `python scripts/bench_x.py ...`."""
    script = Path(sys.argv[0]).resolve()
    shown = os.path.relpath(script, ROOT) if script.is_relative_to(ROOT) else sys.argv[0]
    return shlex.join(["python", shown, *sys.argv[1:]])


# ---------------------------------------------------------------------------- writing


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section under `heading` (up to the next `## ` heading), leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Results\n"
    lines = text.splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = [*section.splitlines(), ""]  # the blank line keeps the next heading apart
    else:
        lines += ["", *section.splitlines()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def pyplot():
    """matplotlib.pyplot drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


HARNESS_FLAGS = ("quick", "report", "out")


class Bench:
    """One benchmark's command line and results: see the module docstring."""

    def __init__(self, doc: str, heading: str, *, name: str | None = None, runs: Mapping | None = None,
                 quick: Mapping | None = None, runs_alias: str | None = None):
        # the script the heading names, "## Domain pruning (bench_dpruner)": results/bench_dpruner.json
        named = re.search(r"\((\w+)\)$", heading)
        self.name = name or (named.group(1) if named else Path(sys.argv[0]).stem)
        self.heading, self.runs, self.quick_settings = heading, dict(runs or {}), dict(quick or {})
        self.parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        if self.runs:
            flags = ["--runs", *([runs_alias] if runs_alias else [])]  # the alias: the flag's older name
            self.parser.add_argument(*flags, dest="runs", nargs="+", default=list(self.runs), choices=list(self.runs),
                                     help="which of the declared runs to measure (default: all)")
        quick_help = ", ".join(f"{k}={v}" for k, v in self.quick_settings.items()) or "as declared"
        self.parser.add_argument("--quick", action="store_true",
                                 help=f"a smoke test ({quick_help}), written under {os.path.relpath(QUICK, ROOT)}/")
        self.parser.add_argument("--report", action="store_true",
                                 help="measure nothing: re-render the RESULTS.md section and plots from the JSON")
        self.parser.add_argument("--out", type=Path, help="folder of results/<name>.json, RESULTS.md and the plots "
                                 "(default docs/, or the quick folder with --quick)")
        self.args: argparse.Namespace | None = None
        self.dir = DOCS

    def option(self, *args, **kwargs) -> Bench:
        """A benchmark's own flag (argparse's add_argument)."""
        self.parser.add_argument(*args, **kwargs)
        return self

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        args = self.parser.parse_args(argv)
        if args.quick:
            for key, value in self.quick_settings.items():
                setattr(args, key, value)
        self.dir = args.out or (QUICK if args.quick else DOCS)
        self.args = args
        return args

    def settings(self) -> dict:
        """The benchmark's own flags as parsed (the harness's left out): what a result's config records."""
        return {k: v for k, v in vars(self.args).items() if k not in HARNESS_FLAGS}

    @property
    def json_path(self) -> Path:
        return self.dir / "results" / f"{self.name}.json"

    @property
    def results_path(self) -> Path:
        return self.dir / "RESULTS.md"

    def load(self) -> dict:
        """The recorded results ({} where there are none yet)."""
        return json.loads(self.json_path.read_text()) if self.json_path.exists() else {}

    def earlier(self, **budget) -> dict:
        """The recorded results if they were measured with the same `budget` fields, else {}: runs of
        earlier invocations are kept only while they stay comparable."""
        earlier = self.load()
        return earlier if all(earlier.get(k) == v for k, v in budget.items()) else {}

    def locked(self):
        """A lock on results/<name>.json across processes: hold it to read, change and record the results
        while another process may be recording into them too."""
        from filelock import FileLock

        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.json_path) + ".lock")

    def record(self, **fields) -> dict:
        """Write `fields` to results/<name>.json with the command, date and machine; returns the result."""
        result = {"command": command(), "date": now(), "machine": machine(), **fields}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(result, indent=2) + "\n")
        return result

    def sweep(self, run: Callable[..., dict], items: Iterable, key: tuple[str, ...], runs: list[dict],
              fields: Mapping | Callable[[list[dict]], Mapping] | None = None, order: list | None = None,
              show: tuple[str, ...] = ()) -> dict:
        """Measure `run(*item)` for each item; each new run replaces an earlier one with the same `key`
        fields (sorted by `order` of the first key where given), and the runs are recorded after every
        run with `fields` (or `fields(runs)`), so nothing is lost if the benchmark is stopped. Prints the
        run's key and its `show` metrics as it goes; returns the last result.

        Several processes may sweep into the same JSON at once (e.g. one per seed on a multi-core
        machine): each record is written under a file lock and takes in the runs another process
        recorded meanwhile (those on disk that differ from what was there when this sweep began)."""
        ident = lambda r: json.dumps([r.get(k) for k in key])
        at_start = {ident(r): r for r in self.load().get("runs", [])}
        mine: set[str] = set()
        result = self.load()
        for item in items:
            r = run(*item) if isinstance(item, tuple) else run(item)
            shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k in show if (v := metric(r, k)) == v]
            print(" ".join(str(r[k]) for k in key if k in r) + ": " + ", ".join(shown), flush=True)
            mine.add(ident(r))
            with self.locked():
                for other in self.load().get("runs", []):
                    if ident(other) not in mine and other != at_start.get(ident(other)):
                        runs = upsert(runs, other, *key)
                runs = upsert(runs, r, *key)
                if order:
                    runs.sort(key=lambda x: order.index(x[key[0]]) if x[key[0]] in order else len(order))
                result = self.record(**(fields(runs) if callable(fields) else fields or {}), runs=runs)
        return result

    def save_figure(self, fig, name: str, ax=None) -> None:
        """<out>/<name> at the resolution every benchmark plot uses; the figure is closed. With `ax`,
        that axis gets the plots' usual light grid and small legend first."""
        if ax is not None:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        self.dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.dir / name, dpi=120)
        pyplot().close(fig)

    def publish(self, result: dict, render: Callable[[dict], str], plot: Callable[[dict], None] | None = None) -> str:
        """Rewrite this benchmark's section of RESULTS.md (and its plots) from `result`; print it. A
        `note` in the result (a caveat added by hand, e.g. that the figures predate a fix) comes first."""
        section = render(result)
        if result.get("note"):
            heading, _, body = section.partition("\n\n")
            section = f"{heading}\n\n{result['note']}\n\n{body}"
        write_section(self.results_path, self.heading, section)
        if plot:
            plot(result)
        print(section)
        print(f"wrote {os.path.relpath(self.results_path, ROOT)} ({self.heading[3:]})", file=sys.stderr)
        return section

    def main(self, measure: Callable[[argparse.Namespace], dict], render: Callable[[dict], str],
             plot: Callable[[dict], None] | None = None, argv: list[str] | None = None) -> dict:
        """Parse the flags; measure (unless --report), then publish."""
        args = self.parse(argv)
        if args.report:
            if not self.json_path.exists():
                raise SystemExit(f"--report: no results at {self.json_path}")
            result = self.load()
        else:
            result = measure(args)
        self.publish(result, render, plot)
        return result
