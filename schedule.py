"""The learning rate at each step: linear warmup, then a cosine down to min_lr (GPT-2, nanoGPT), or wsd: flat,
then a linear decay over the last decay_fraction of the steps (nanochat, the modded-nanogpt speedruns), which a
longer run can extend from any checkpoint before the decay."""
import math

from config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then down to min_lr at max_steps (and min_lr after): a cosine, or (wsd)
    flat until decay_start and linear from there. cfg is resolved (config.resolve): min_lr is set."""
    min_lr = cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    start = decay_start(cfg)
    progress = max(0, step - start) / max(1, cfg.max_steps - start)
    if cfg.lr_schedule == "wsd":
        return cfg.learning_rate + progress * (min_lr - cfg.learning_rate)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - min_lr)


def decay_start(cfg: TrainConfig) -> int:
    """The step where the learning rate starts to fall. A wsd run can be extended (a larger --max-steps) from any
    checkpoint before it, and the checkpoint at it is always kept; a cosine falls from the end of warmup."""
    if cfg.lr_schedule == "wsd":
        return max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps))
    return cfg.warmup_steps
