"""A rank's model wrappers and optimiser, built from the trainer config with Megatron-core's own DDP, optimiser
and learning-rate scheduler (`trainer.args` reaches OptimizerConfig through `apply_args`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def wrap(w: Any, model: Any, apply_args: Callable[[Any], None]) -> tuple[Any, Any, Any]:
    """(model, optimizer, scheduler) for worker `w` (its `cfg` and `tcfg`); no optimiser when
    `trainer.optimizer: false`."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    c = w.cfg
    if c.dtype == "bfloat16":
        model = Float16Module(w.tcfg, model)
    if not c.optimizer:
        return model, None, None
    ddp = DistributedDataParallel(
        config=w.tcfg,
        module=model,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=c.distributed_optimizer
        ),
    )
    w.tcfg.finalize_model_grads_func = finalize_model_grads
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=c.lr,
        min_lr=c.min_lr,
        weight_decay=c.weight_decay,
        adam_beta1=c.adam_beta1,
        adam_beta2=c.adam_beta2,
        clip_grad=c.clip_grad,
        bf16=c.dtype == "bfloat16",
        params_dtype=w.tcfg.params_dtype,
        use_distributed_optimizer=c.distributed_optimizer,
    )
    apply_args(ocfg)
    optimizer = get_megatron_optimizer(ocfg, [ddp])
    decay = c.lr_decay_steps or 10**9
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if c.warmup_steps else c.lr,
        max_lr=c.lr,
        min_lr=c.min_lr,
        lr_warmup_steps=c.warmup_steps,
        lr_decay_steps=max(decay, c.warmup_steps + 1),
        lr_decay_style="cosine" if c.lr_decay_steps else "constant",
        start_wd=c.weight_decay,
        end_wd=c.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    return ddp, optimizer, scheduler


def reset(optimizer: Any, scheduler: Any) -> None:
    """Adam's moments and step counts are made lazily on the next step once the state is empty (torch's and
    Transformer Engine's Adam alike), so emptying it is a fresh optimiser over the same parameters. The schedule
    restarts too: fresh Adam's first steps are sign steps (m/sqrt(v) = ±1 per weight), which moved a 0.5B model by
    lr on every weight at once and wrecked it in one RL step (H200, lr 1e-5); `trainer.warmup_steps` is what
    tames that, and it must apply to the new phase, not only to the warm start."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt.optimizer.state.clear()
    scheduler.num_steps = 0
    scheduler.step(increment=0)


def set_peak_lr(optimizer: Any, scheduler: Any, lr: float) -> None:
    """Change the peak learning rate (e.g. SFT warm start vs RL) without touching optimiser state. Megatron's
    scheduler reads each param group's own `max_lr` / `min_lr` before its own (set from the config when the
    optimiser was built): setting only the scheduler's changed nothing, and the warm start ran at trainer.lr."""
    scheduler.max_lr = lr
    scheduler.init_lr = min(scheduler.init_lr, lr)
    scheduler.min_lr = min(scheduler.min_lr, lr)
    for group in optimizer.param_groups:
        group["max_lr"] = lr
        group["min_lr"] = min(group.get("min_lr", lr), lr)
    scheduler.step(increment=0)
