"""Training: the Ray Train worker loop, evaluation, checkpoints, logging, and the driver that starts it."""
