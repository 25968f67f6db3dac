"""The distillation engine: networks, the training loop, EMA, precision and checkpoints."""
