"""The training loop (accelerate), tasks that plug into it, checkpoints and logs."""
