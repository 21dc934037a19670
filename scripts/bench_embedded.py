"""The embedded default, measured: sizes of the shipped models and data, the default SFT
run (time, validation and test accuracy), and SmolLM2's perplexity on held-out Shakespeare.

    python scripts/bench_embedded.py            # uses the cached SFT base if `make base` ran, else runs it
    python scripts/bench_embedded.py --rerun    # run the default SFT again (~5 min on 2 CPU cores)
    python scripts/bench_embedded.py --report   # re-render the table from the JSON

Writes docs/results/embedded.json and the "Embedded default" section of docs/RESULTS.md.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from rlx.benchmark import ROOT, Bench, machine_line
from rlx.config import build, compose_config
from rlx.paths import cache_dir

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
bench = Bench(__doc__, "## Embedded default", name="embedded")
bench.option("--rerun", action="store_true", help="run the default SFT again even if cached")


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def sizes() -> dict:
    from rlx.data.collate import lm_batch
    from rlx.models import smollm2

    cfg = compose_config("train")
    tiny = build(cfg.model)
    task = build(cfg.data)
    train = task.split("train")
    lengths = [int(lm_batch([ex], tiny.tokenizer, 10**6)["attention_mask"].sum()) for ex in train[:2000]]
    shakespeare = build(compose_config("train", ["data=shakespeare"]).data)
    out = {
        "tiny_params": sum(p.numel() for p in tiny.model.parameters()),
        "tiny_vocab": len(tiny.tokenizer),
        "smollm2_params": sum(p.numel() for p in smollm2(device="cpu").model.parameters()),
        "smollm2_cache_mb": folder_mb(cache_dir() / "models" / "smollm2-135m-instruct"),
        "reasoning_split_sizes": {s: len(task.split(s)) for s in ("train", "validation", "test")},
        "reasoning_mean_tokens": sum(lengths) / len(lengths),
        "reasoning_recheck_share": sum("check:" in ex["completion"] for ex in train) / len(train),
        "shakespeare_chunks": {s: len(shakespeare.split(s)) for s in ("train", "validation", "test")},
        "shakespeare_mb": folder_mb(cache_dir() / "shakespeare"),
    }
    if GSM8K.is_dir():
        gsm = build(compose_config("train", ["data=gsm8k", f"data.path={GSM8K}"]).data)
        out["gsm8k_split_sizes"] = {s: len(gsm.split(s)) for s in ("train", "validation", "test")}
    return out


def default_sft(rerun: bool) -> dict:
    from rlx.base import base_dir, build_base
    from rlx.evaluate import evaluate

    base = base_dir()
    if rerun or not (base / "base.json").exists():
        build_base([])
    summary = json.loads((base / "base.json").read_text())
    cfg = compose_config("train", ["model=tiny_sft"])
    policy, task = build(cfg.model), build(cfg.data)
    test = evaluate(policy.model, policy.tokenizer, task, "test", 512, 64, 160, 512)
    # Chance level: always answering the most common training answer.
    common = Counter(ex["answer"] for ex in task.split("train")).most_common(1)[0][0]
    guess = sum(task.score(f"#### {common}", ex) for ex in task.split("test")) / len(task.split("test"))
    return {"constant_guess_accuracy": guess,"validation": {k: summary[k] for k in summary if k.startswith("eval/")}, "test": test,
            "steps": summary["steps"], "train_time_s": summary["train/time_s"], "wall_time_s": summary["wall_time_s"],
            "tokens_per_s": summary["train/tokens_per_s"], "overrides": summary["overrides"]}


def smollm2_perplexity() -> dict:
    from rlx.evaluate import evaluate
    from rlx.models import smollm2

    policy = smollm2(device="cpu")
    task = build(compose_config("train", ["data=shakespeare"]).data)
    t0 = time.perf_counter()
    metrics = {s: evaluate(policy.model, policy.tokenizer, task, s, 10**6, 8, 0, 512) for s in ("validation", "test")}
    return {**metrics, "time_s": time.perf_counter() - t0}


def markdown(r: dict) -> str:
    s, sft, ppl, m = r["sizes"], r["sft"], r["smollm2_shakespeare"], r["machine"]
    rs, sh = s["reasoning_split_sizes"], s["shakespeare_chunks"]
    lines = [
        bench.heading,
        "",
        "| what | figure |",
        "|---|---|",
        f"| `model=tiny` | {s['tiny_params'] / 1e6:.2f}M parameters, {s['tiny_vocab']}-token character vocabulary |",
        f"| `model=smollm2` | {s['smollm2_params'] / 1e6:.1f}M parameters ({s['smollm2_cache_mb']:.0f} MB float32 safetensors in the cache, from a Q4_1 GGUF) |",
        f"| `data=reasoning` (default) | {rs['train']:,} / {rs['validation']} / {rs['test']} train/validation/test problems, "
        f"{s['reasoning_mean_tokens']:.0f} tokens per example on average, {s['reasoning_recheck_share']:.0%} of train traces re-check their steps |",
        f"| `data=shakespeare` | {s['shakespeare_mb']:.1f} MB, {sh['train']:,} / {sh['validation']} / {sh['test']} chunks of 1,024 characters |",
    ]
    if "gsm8k_split_sizes" in s:
        g = s["gsm8k_split_sizes"]
        lines.append(f"| `data=gsm8k` | {g['train']:,} / {g['validation']} / {g['test']:,} problems |")
    v, t = sft["validation"], sft["test"]
    lines += [
        f"| default `rlx train` (SFT, {sft['steps']} steps) | {sft['train_time_s'] / 60:.1f} min of training "
        f"({sft['wall_time_s'] / 60:.1f} min wall with evals), {sft['tokens_per_s']:,.0f} target tokens/s |",
        f"| its accuracy | validation **{v['eval/accuracy']:.1%}**, test **{t['eval/accuracy']:.1%}** (greedy; "
        f"mean response {t['eval/response_len']:.0f} tokens); always giving the most common answer scores "
        f"{sft['constant_guess_accuracy']:.1%} |",
        f"| SmolLM2 on held-out Shakespeare | perplexity **{ppl['test']['eval/perplexity']:.2f}** on test "
        f"({ppl['validation']['eval/perplexity']:.2f} on validation), per SmolLM2 token, each 1,024-character chunk scored on its own |",
        "",
        f"- Machine: {machine_line(m, libs=('torch', 'transformers'))}.",
        f"- Command: `{r['command']}` ({r['date']}).",
        "",
    ]
    return "\n".join(lines)


def measure(args) -> dict:
    return bench.record(sizes=sizes(), sft=default_sft(args.rerun), smollm2_shakespeare=smollm2_perplexity())


if __name__ == "__main__":
    bench.main(measure, markdown)
