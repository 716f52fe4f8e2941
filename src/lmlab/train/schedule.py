"""Learning-rate schedules: pure functions of the step."""

from __future__ import annotations

import math

from lmlab.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to a
    floor (cosine, linear), none (constant), or a stable phase and then a linear decay (wsd,
    whose last step reaches the floor)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        # Stable at lr, then linear to the floor over the last decay_fraction of the steps:
        # the decay's start depends on max_steps, the steps before it do not.
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        decay_start = max(cfg.warmup_steps, cfg.max_steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / max(1, cfg.max_steps - decay_start))
        return cfg.lr - (cfg.lr - floor) * progress
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
