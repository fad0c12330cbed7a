"""Training: the loop, its step, schedule and state, and the optimizers."""
