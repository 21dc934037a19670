"""Training-time quantization: hooks of the `quantizer=` config group that change how the loop's
model holds or sees its weights while it trains.

* formats.py  low-precision weight formats (FP8 E4M3, group-wise INTn, fixed grid): codes + scales
* stored.py   linear layers that hold codes between steps, fake-quantized linears, the module swap
* eco.py      `quantizer=eco | no_master | master`: training without fp32 master weights
* qat.py      `quantizer=qat`: fake-quantized training with FP -> QAT phases
* lsq.py      LSQ fake quantization with elastic steps, the space of configurations EQ-Net trains
* eqnet.py    `quantizer=eqnet`: the EQ-Net hook (one LSQ model over bits, granularity, symmetry)

Post-training compression (`rlx quantize`, `rlx prune`) is rlx/compress/; the robustness probe
(`hooks=robustness`) is rlx/robustness.py.
"""
