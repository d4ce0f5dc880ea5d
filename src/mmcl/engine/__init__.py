"""The continual engine: the task loop, the step loop, checkpoints."""
