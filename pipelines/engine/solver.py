"""SGD with linear warm-up and step decay, as in the Mask R-CNN recipe."""

from __future__ import annotations

import torch

from pipelines.config import SolverConfig, check_values
from pipelines.errors import MaskxError


def check_solver(cfg: SolverConfig) -> None:
    """Raise naming the key at the first solver value out of range (``solver.lr must be > 0, got -1``).

    :func:`pipelines.config.load_config` checks this on every load; this is for a config built in code.
    """
    check_values(cfg, "solver.")


def build_optimizer(params, cfg: SolverConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW, over the parameters that require gradients."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.effective_lr(), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.effective_lr(), weight_decay=cfg.weight_decay)
    raise MaskxError(f"unknown solver.optimizer '{cfg.optimizer}' (expected sgd | adamw)")


def lr_factor(iteration: int, cfg: SolverConfig) -> float:
    """Multiplier of the base LR at ``iteration`` (0-based): linear warm-up, then x gamma at each step."""
    factor = 1.0
    if iteration < cfg.warmup_iters:
        alpha = iteration / max(1, cfg.warmup_iters)
        factor = cfg.warmup_factor * (1 - alpha) + alpha
    for frac in cfg.lr_steps:
        if iteration >= int(frac * cfg.iterations):
            factor *= cfg.lr_gamma
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
