"""Training loop, optimizer, schedule, checkpoints."""
