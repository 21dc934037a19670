"""The GPU check: what the CPU test suite cannot show, on one CUDA device, in a few minutes.

    python scripts/gpu_check.py                        # model=smollm2, 4 GRPO steps per setting
    python scripts/gpu_check.py --model tiny_sft --steps 8 --out outputs/gpu_check

On a CUDA machine with rlx installed (`make install TORCH=torch`, plus `pip install -e '.[vllm]'` for
the vLLM engine). Each check is one `rlx train` run through `run_training`, on the same prompts:
    engines     GRPO with rollout=rlx and, where vLLM imports, rollout=vllm (+ sequence-level MIS):
                seconds per step, rollout tokens/s, the first step's peak memory, the sampler-trainer
                mismatch (mismatch/kl_k3, logged with any engine but rlx's own sampler: for rlx the
                check runs rollout=perturbed with no noise, i.e. a bf16-free exact copy)
    bf16        the same GRPO steps at trainer.precision=fp32 and bf16 from the same seed: the largest
                relative difference of the per-step losses
    qlora       model=hf load_in_4bit=true with LoRA (bitsandbytes NF4), two SFT steps, where
                bitsandbytes finds a GPU
Prints a table and writes <out>/gpu_check.json and <out>/gpu_check.md; a check that cannot run here
says why in its row instead of failing the rest.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

COMMON = ["algo=grpo", "model.device=cuda", "algo.group_size=8", "algo.max_new_tokens=256",
          "trainer.micro_batch_size=8", "trainer.eval_every=0", "trainer.save_every=0", "trainer.eval_samples=0",
          "trainer.log_every=1", "trainer.progress=false", "trainer.warmup_steps=0", "trainer.lr_scheduler=constant",
          "optimizer.lr=1e-6"]


def train(overrides: list[str]) -> tuple[dict, list[dict]]:
    from rlx.benchmark import read_rows
    from rlx.config import compose_config
    from rlx.tasks import run_training

    with tempfile.TemporaryDirectory() as tmp:
        summary = run_training(compose_config("train", overrides), Path(tmp))
        return summary, read_rows(Path(tmp))


def mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def engines(model: str, steps: int) -> list[dict]:
    out = []
    settings = {"rlx (exact copy, bf16 autocast)": ["rollout=perturbed"]}
    try:
        import vllm  # noqa: F401

        settings["vllm (+ sequence_mask MIS)"] = ["rollout=vllm", "algo.is_correction=sequence_mask"]
    except ImportError:
        out.append({"check": "engine vllm", "result": "not run: vLLM does not import here"})
    for name, extra in settings.items():
        t0 = time.perf_counter()
        s, rows = train([*COMMON, f"model={model}", "trainer.precision=bf16", f"trainer.max_steps={steps}", *extra])
        out.append({"check": f"engine {name}", "s_per_step": s["train/time_s"] / steps,
                    "rollout_tokens_per_s": mean(rows, "rl/rollout_tokens_per_s"),
                    "peak_MB": s.get("memory/step_peak_MB"), "mismatch_kl_k3": mean(rows, "mismatch/kl_k3"),
                    "wall_s": time.perf_counter() - t0})
    return out


def bf16_parity(model: str, steps: int) -> dict:
    losses = {}
    for precision in ("fp32", "bf16"):
        _, rows = train([*COMMON, f"model={model}", f"trainer.precision={precision}", f"trainer.max_steps={steps}",
                         "algo.max_new_tokens=64", "seed=0"])
        losses[precision] = [r["train/loss"] for r in rows if "train/loss" in r]
    diffs = [abs(a - b) / max(abs(a), 1e-8) for a, b in zip(losses["fp32"], losses["bf16"])]
    return {"check": "bf16 loss parity", "fp32": losses["fp32"], "bf16": losses["bf16"],
            "max_rel_diff": max(diffs) if diffs else None,
            "note": "sampling in bf16 can pick other tokens, so losses after the first step may differ more"}


def qlora(path: str) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"check": "qlora", "result": "not run: bitsandbytes does not import here"}
    s, rows = train(["algo=sft", "model=hf", f"model.name_or_path={path}", "model.load_in_4bit=true",
                     "model.dtype=bfloat16", "model.lora={r:16,lora_alpha:32,target_modules:all-linear}",
                     "model.device=cuda", "trainer.max_steps=2", "trainer.micro_batch_size=8", "trainer.eval_every=0",
                     "trainer.save_every=0", "trainer.eval_samples=0", "trainer.log_every=1", "trainer.progress=false"])
    return {"check": "qlora (bitsandbytes NF4 + LoRA, 2 SFT steps)", "loss": [r["train/loss"] for r in rows
                                                                               if "train/loss" in r],
            "peak_MB": s.get("memory/step_peak_MB"), "params_M": s.get("params_M")}


def hub_folder(model: str) -> str:
    """The HF-format folder of `model` (smollm2 and tiny_sft are cached as plain checkpoints)."""
    from rlx import models

    policy = getattr(models, model)(device="cpu")
    return str(policy.model.name_or_path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a model option: smollm2 (default) or tiny_sft")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("outputs/gpu_check"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible; this check is for a GPU machine")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "bf16": torch.cuda.is_bf16_supported(), "model": args.model, "checks": []}
    jobs = {"engines": lambda: engines(args.model, args.steps), "bf16": lambda: [bf16_parity(args.model, 3)],
            "qlora": lambda: [qlora(hub_folder(args.model))]}
    for name, job in jobs.items():
        try:
            report["checks"] += job()
        except Exception as e:  # one broken check must not hide the others' figures
            report["checks"].append({"check": name, "error": repr(e), "trace": traceback.format_exc(limit=3)})
        print(json.dumps(report["checks"][-1], default=str), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"GPU check on {report['device']} (torch {report['torch']}, bf16 {report['bf16']}), model={args.model}", ""]
    lines += [f"- {c.pop('check', '?')}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for c in report["checks"]]
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
