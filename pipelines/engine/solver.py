"""SGD with linear warm-up and step decay, as in the Mask R-CNN recipe.

Biases may train with their own LR and weight decay (``solver.bias_lr_factor``,
``solver.bias_weight_decay_factor``): the original code (Detectron, ``lib/modeling/optimizer.py``) gives the
biases of its conv and FC layers 2x the LR and no weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.config import SolverConfig, check_values
from pipelines.errors import MaskxError


def check_solver(cfg: SolverConfig) -> None:
    """Raise naming the key at the first solver value out of range (``solver.lr must be > 0, got -1``).

    :func:`pipelines.config.load_config` checks this on every load; this is for a config built in code.
    """
    check_values(cfg, "solver.")


def layer_biases(model: nn.Module) -> set[int]:
    """``id`` of the bias of every conv and linear layer of ``model`` (Detectron's ``model.biases``).

    Norm layers' shifts are not counted (Detectron keeps GroupNorm's apart, ``gn_params``).
    """
    layers = (nn.Linear, nn.modules.conv._ConvNd)
    return {id(m.bias) for m in model.modules() if isinstance(m, layers) and isinstance(m.bias, nn.Parameter)}


def param_groups(model: nn.Module, cfg: SolverConfig) -> list[dict]:
    """The optimizer's parameter groups over the parameters of ``model`` that require gradients.

    One group at the base LR and weight decay; with ``bias_lr_factor`` or ``bias_weight_decay_factor``
    other than 1, the layer biases (:func:`layer_biases`) in a second group at ``bias_lr_factor`` x the
    LR and ``bias_weight_decay_factor`` x the weight decay. The first group is always the weights' (the
    LR that is logged). ``lr`` of each group is its LR at the schedule's factor 1.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr, wd = cfg.effective_lr(), cfg.weight_decay
    if cfg.bias_lr_factor == 1.0 and cfg.bias_weight_decay_factor == 1.0:
        return [{"params": params, "lr": lr, "weight_decay": wd}]
    biases = layer_biases(model)
    return [{"params": [p for p in params if id(p) not in biases], "lr": lr, "weight_decay": wd},
            {"params": [p for p in params if id(p) in biases], "lr": lr * cfg.bias_lr_factor,
             "weight_decay": wd * cfg.bias_weight_decay_factor}]


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW over ``model``'s trainable parameters, grouped by :func:`param_groups`."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.effective_lr(), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.effective_lr(), weight_decay=cfg.weight_decay)
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
