"""Build the SFT base model that RL runs start from (`model=tiny_sft`), and cache it.

    make base                       # = python scripts/build_base.py
    python scripts/build_base.py trainer.max_steps=1200   # any train overrides

Runs the default `rlx train` (SFT of model=tiny on the reasoning task) into
$RLX_CACHE/runs/tiny-sft, then copies its last checkpoint to $RLX_CACHE/models/tiny-sft
(under a temporary name, then renamed) with the run's summary beside it as base.json.
"""
import json
import os
import shutil
import sys

from rlx.config import compose_config
from rlx.paths import cache_dir
from rlx.state import find_checkpoint
from rlx.tasks import run_training


def main(overrides: list[str]) -> None:
    run_dir = cache_dir() / "runs" / "tiny-sft"
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = run_training(compose_config("train", overrides), run_dir)
    target = cache_dir() / "models" / "tiny-sft"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(find_checkpoint(run_dir), tmp)
    (tmp / "base.json").write_text(json.dumps({"overrides": overrides, **summary}, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    print(f"SFT base model: {target}  (eval/accuracy {summary.get('eval/accuracy', float('nan')):.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
