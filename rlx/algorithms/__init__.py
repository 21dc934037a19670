"""Training objectives, one module each. An algorithm is a class with

    make_batch(examples, state) -> dict   # tensors for one micro-batch (RL: run rollouts here)
    loss(batch, state) -> (loss, metrics) # a scalar averaged over the batch's `num_targets`

`make_batch` must put `num_targets` (how many units the loss averages over, e.g. target
tokens) in the batch: the loop weights micro-batches by it, so 1 x 8 and 8 x 1 accumulation
give the same gradient. Where those units are not tokens (pairs, sequences), `num_tokens`
tells the loop how many tokens the batch trained on, for `train/tokens` and throughput.
Shared math lives in pure functions, not base classes.
"""
