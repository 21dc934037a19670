"""Training-time quantization, injected through the loop's hooks (`quantizer=` config group).

* formats.py  low-precision weight formats (FP8 E4M3, group-wise INTn, fixed grid): codes + scales
* stored.py   linear layers that hold codes between steps, fake-quantized linears, the module swap
* eco.py      `quantizer=eco | no_master | master`: training without fp32 master weights
* qat.py      `quantizer=qat`: fake-quantized training with FP -> QAT phases
* eqnet.py    `quantizer=eqnet`: EQ-Net elastic quantization (one LSQ model over bits, granularity, symmetry)
* metrics.py  quantization-robustness metrics (MMR, kurtosis, relative error propagation; `hooks=robustness`)
"""
