"""The SFT base model that RL, preference and compression runs start from (`model=tiny_sft`):
the tiny model after the default `rlx train` (SFT on the reasoning task), built on first use,
once, and cached at $RLX_CACHE/models/tiny-sft. `model=tiny_sft_hard` is the same model after SFT
on `data=reasoning_hard` (easy and hard problems, long-tailed re-checks), at $RLX_CACHE/models/tiny-sft-hard.

    python -m rlx.base                      # = make base: (re)build it now
    python -m rlx.base trainer.max_steps=1200
    python -m rlx.base --name tiny-sft-hard # the hard task's base

A run that needs the base and finds none builds it in a child process (its own seed, Hydra state
and progress bar, so the run that asked is unchanged), under a file lock: runs of a sweep that
start together wait for the one build instead of racing it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from rlx.errors import RlxError
from rlx.paths import cache_dir

MINUTES = "5-10 minutes on 2 CPU cores"  # 1,000 SFT steps of the 1.8M-parameter model (conf/train.yaml)
# Each base: the SFT run's overrides (after algo=sft model=tiny) and how long it takes to build.
BASES = {
    "tiny-sft": (["data=reasoning"], MINUTES),
    # Traces of up to ~470 characters: the SFT window and the evaluation budget grow to fit them.
    # 1,000 steps left it at 51% easy / 6% hard (loss still falling fast); 3,000 reach 90% / 37.5%.
    "tiny-sft-hard": (["data=reasoning_hard", "algo.max_length=512", "trainer.eval_max_length=512",
                       "trainer.eval_max_new_tokens=480", "trainer.eval_samples=128",
                       "trainer.max_steps=3000", "trainer.eval_every=1000"], "60-90 minutes on 2 CPU cores"),
    # tiny-sft-hard after more SFT on the same task with 30% of its traces folded (two steps a line):
    # a base that sometimes answers in fewer, riskier lines, so a length reward has a shortcut to pay for
    "tiny-sft-fold": (["model=tiny_sft_hard", "data=reasoning_hard", "data.fold_prob=0.3", "algo.max_length=512",
                       "trainer.eval_max_length=512", "trainer.eval_max_new_tokens=480", "trainer.eval_samples=128",
                       "optimizer.lr=1e-3", "trainer.max_steps=600", "trainer.eval_every=300"],
                      "10-15 minutes on 2 CPU cores, after tiny-sft-hard"),
}


def base_dir(name: str = "tiny-sft") -> Path:
    if name not in BASES:
        raise RlxError(f"unknown SFT base {name!r}; valid: {', '.join(BASES)}")
    return cache_dir() / "models" / name


def is_built(target: Path | None = None) -> bool:
    """Whether the base (or the checkpoint folder `target`) is complete: its config is written last."""
    return ((target or base_dir()) / "config.json").exists()


def weights_digest(name: str = "tiny-sft", folder: Path | None = None) -> str:
    """The first 12 hex digits of the SHA-256 of the base's weights (or of those in `folder`): which
    build a result was measured on."""
    import hashlib

    digest = hashlib.sha256()
    with open((folder or base_dir(name)) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def ensure_base(overrides: list[str] | tuple[str, ...] = (), name: str = "tiny-sft") -> Path:
    """The cached SFT base `name`, built first (once, under a lock) if it is not there yet."""
    target = base_dir(name)
    if is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"rlx: another run is building the SFT base model at {target}; waiting for it", file=sys.stderr)
        lock.acquire()
    try:
        if is_built(target):  # built by the run we waited for
            return target
        how = "`make base` does the same" if name == "tiny-sft" else f"`python -m rlx.base --name {name}` does the same"
        print(f"rlx: no SFT base model {name} yet: building it once ({BASES[name][1]}; {how}), "
              f"then caching it at {target}", file=sys.stderr, flush=True)
        from rlx.distributed import TORCHRUN_VARS

        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}  # one process, even under torchrun
        done = subprocess.run([sys.executable, "-m", "rlx.base", "--name", name, *overrides], env=env)
        if done.returncode != 0 or not is_built(target):
            raise RlxError(f"building the SFT base model failed (exit {done.returncode}); `make base` shows why")
    finally:
        lock.release()
    return target


def build_base(overrides: list[str], name: str = "tiny-sft") -> dict:
    """Train the base `name` into $RLX_CACHE/runs/<name> and copy its last checkpoint to the cache
    (under a temporary name, then renamed), with the run's summary beside it as base.json."""
    from rlx.config import compose_config
    from rlx.state import find_checkpoint
    from rlx.tasks import run_training

    target = base_dir(name)
    run_dir = cache_dir() / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = run_training(compose_config("train", ["algo=sft", "model=tiny", *BASES[name][0], *overrides]), run_dir)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(find_checkpoint(run_dir), tmp)
    (tmp / "base.json").write_text(json.dumps({"overrides": overrides, "weights_sha256": weights_digest(folder=tmp),
                                               **summary}, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    print(f"SFT base model: {target}  (eval/accuracy {summary.get('eval/accuracy', float('nan')):.3f})")
    return summary


if __name__ == "__main__":
    args = sys.argv[1:]
    name = "tiny-sft"
    if args[:1] == ["--name"]:
        name, args = args[1], args[2:]
    try:
        build_base(args, name)
    except RlxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
