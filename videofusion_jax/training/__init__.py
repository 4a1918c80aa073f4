"""Train state, sharding, optimizer, checkpoints and the training loop."""
