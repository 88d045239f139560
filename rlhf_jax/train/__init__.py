"""Training: the train state, jitted steps, optimizers, the loop, Orbax checkpoints and metrics."""
