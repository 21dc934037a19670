"""Post-training compression of a trained model (`rlx quantize`, `rlx prune`): calibrate on the
task's examples, change the weights block by block, write a checkpoint transformers loads.

* gptq.py     grids, codes, round-to-nearest and GPTQ's error-compensating column sweep
* baq.py      BAQ's closed-form per-column bit allocation
* ptq.py      the quantize methods (RTN, GPTQ, BAQ, HQQ) and `quantize_model`
* prune.py    the prune methods (magnitude, Wanda) and `prune_model`
* dpruner.py  D-Pruner: whole-model dual importance from an open-domain and a domain set
* run.py      `run_quantize` / `run_prune`: build, calibrate, compress, save, evaluate

Methods are config groups of their own command (conf/quantize/method/, conf/prune/method/).
"""
