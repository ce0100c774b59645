"""The learning-rate schedule: ``transformers.get_scheduler`` under the names TRL users know.

``optim.scheduler`` is one of :data:`SCHEDULERS`, transformers' ``SchedulerType`` names for the
schedules that depend on the step alone (``reduce_lr_on_plateau`` and ``greedy`` need a metric and
are not offered). ``optim.warmup_steps`` is the linear warmup from 0 (transformers' warmup: the
first step runs at ``lr * 0 / warmup_steps``); ``optim.scheduler_kwargs`` are transformers'
``scheduler_specific_kwargs`` / TRL's ``lr_scheduler_kwargs`` (``cosine_with_min_lr`` needs
``min_lr`` or ``min_lr_rate``; ``num_cycles``, ``power``, ... for the others). The horizon is
``run.max_steps``; the scheduler steps once per GRPO step.

Our earlier names keep working: ``constant`` means a warmup over ``warmup_steps`` and then a
constant rate (transformers' ``constant_with_warmup``; transformers' own ``constant`` ignores the
warmup, and with ``warmup_steps: 0`` the two are the same), ``linear`` and ``cosine`` are
transformers' (decay to 0 at ``run.max_steps``).

The scheduler is a ``LambdaLR`` over a ``functools.partial`` of numbers, so its ``state_dict`` is
plain data (checkpointed with ``torch.load(weights_only=True)``); the schedule's parameters are not
in it but in the config, which a resume checks (:mod:`~compilepass.standby.grpo.resume`).
"""

from __future__ import annotations

from compilepass.core.errors import ConfigError

__all__ = ["SCHEDULERS", "make_lr_scheduler", "scheduler_name"]

SCHEDULERS = ("constant", "cosine", "linear", "constant_with_warmup", "cosine_with_min_lr", "cosine_with_restarts",
              "polynomial", "inverse_sqrt", "cosine_warmup_with_min_lr", "warmup_stable_decay")


def scheduler_name(scheduler: str, warmup_steps: int) -> str:
    """The transformers schedule that ``optim.scheduler`` names (``constant`` with a warmup is
    ``constant_with_warmup``)."""
    if scheduler == "constant" and warmup_steps > 0:
        return "constant_with_warmup"
    return scheduler


def make_lr_scheduler(optim, optimizer, max_steps: int):
    """``transformers.get_scheduler`` for an :class:`~compilepass.standby.grpo.config.OptimConfig`
    over ``max_steps`` steps; ConfigError (one line) when transformers refuses its options."""
    from transformers import get_scheduler

    name = scheduler_name(optim.scheduler, optim.warmup_steps)
    kwargs = dict(getattr(optim, "scheduler_kwargs", None) or {})
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=int(optim.warmup_steps),
                             num_training_steps=int(max_steps), scheduler_specific_kwargs=kwargs or None)
    except (TypeError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"'optim.scheduler_kwargs' {kwargs!r} do not fit optim.scheduler {optim.scheduler!r} "
                          f"(transformers' {name}: {detail})") from None
