"""The SFT base is built on first use, once: a second run started meanwhile waits for the first
build (a file lock across processes) instead of building it again."""
import json
import os
import subprocess
import sys

from rlx.base import weights_digest
from rlx.paths import REPO_ROOT

TINY_BUILD = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
              "data.num_train=64", "data.num_validation=4", "data.num_test=4", "trainer.max_steps=2",
              "trainer.eval_samples=2", "trainer.eval_max_new_tokens=4", "trainer.progress=false"]


def test_two_runs_build_the_base_once(tmp_path):
    env = {**os.environ, "RLX_CACHE": str(tmp_path)}
    code = f"from rlx.base import ensure_base; print('BASE', ensure_base({TINY_BUILD!r}))"
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outputs]
    errs = "".join(err for _, err in outputs)
    assert errs.count("building it once") == 1  # one build; the other run waited for it (or found it done)
    assert all(f"BASE {tmp_path}/models/tiny-sft" in out for out, _ in outputs)
    assert (tmp_path / "models/tiny-sft/config.json").exists() and (tmp_path / "models/tiny-sft/base.json").exists()
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_a_build_is_reproducible_across_processes_and_thread_counts(tmp_path):
    """Two builds of the same base, in separate processes at one and two torch threads, record the
    same weights digest in base.json (the digest benchmarks cite to say which build they measured)."""
    build = [b.replace("max_steps=2", "max_steps=20") for b in TINY_BUILD]
    code = f"from rlx.base import build_base; build_base({build!r})"
    digests = []
    for threads in ("1", "2"):
        env = {**os.environ, "RLX_CACHE": str(tmp_path / threads), "OMP_NUM_THREADS": threads}
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, text=True, capture_output=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        recorded = json.loads((tmp_path / threads / "models/tiny-sft/base.json").read_text())["weights_sha256"]
        assert recorded == weights_digest(folder=tmp_path / threads / "models/tiny-sft")
        digests.append(recorded)
    assert digests[0] == digests[1] and len(digests[0]) == 12
