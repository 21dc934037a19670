"""Memory-efficient optimizers: gradient splitting (FRUGAL, GaLore, Fira), Lion-K, CLASSP.

Each is a `torch.optim.Optimizer` built from `conf/optimizer/<name>.yaml` (`_partial_`); the loop
passes the trainable parameters with their names, so a method can treat layers differently.
"""
