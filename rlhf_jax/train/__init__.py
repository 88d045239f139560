"""Training, config-free: the trainer core (`trainer`: the jitted, donating step and the loop), the pure
step and objectives (`steps`), the state pytree (`state`), optimizers (`optim`), Orbax checkpoints
(`checkpoint`), metrics (`metrics`) and clean stops on SIGTERM or non-finite steps (`preemption`)."""
