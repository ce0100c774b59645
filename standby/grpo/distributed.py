"""Data-parallel GRPO over ``torch.distributed``: ``compilepass grpo`` under ``torchrun --nproc-per-node N``.

Every rank holds the whole model (one copy of the weights, shared by its rollout engine and its
trainer) and its own standby KV region, and runs the step on its share of the prompts:

- the step's ``data.prompts_per_step`` prompts (drawn by the same :class:`PromptBatcher` on every
  rank, so the data position stays global and a run resumes on any N) are split into N equal
  runs of whole prompts (:meth:`DistContext.shard`): all G completions of a prompt are generated,
  scored and normalized on one rank, so the group advantages are exact;
- the gradients of the trainable (LoRA) parameters are averaged with ``all_reduce`` before
  clipping and the optimizer step (:meth:`DistContext.average_gradients`): every rank then holds
  the same gradient and takes the same update, the one a single rank takes over the whole batch.
  The token-normalized losses (bnpo, dapo, cispo) divide by :meth:`DistContext.token_count`, the
  global token count over N, so that the ranks' average is the global loss; grpo and dr_grpo
  divide by rows (equal on every rank), which averaging already gets right;
- the step's metrics are reduced over the ranks (:meth:`DistContext.reduce_metrics`: means of
  the means, sums of counts, min / max, the slowest rank's timings; the batch's reward means and
  stds pooled exactly from counts, sums and sums of squares) and written by rank 0 only;
  checkpoints are written by rank 0 only, after a barrier (the others' state is the same).

Sampling seeds: rank r draws from ``rank_seed(step seed, r)`` (rank 0's is the one-rank seed).
``generation.group_seeds=true`` instead samples each prompt group in its own engine call seeded
from ``(run.seed, step, the group's index in the global batch)``: the completions then do not
depend on N at all (a run's samples, and so its results up to float summation order, are the same
on 1 and N ranks), at the price of generating G sequences per call instead of the whole share.

Backends: NCCL when the run is on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU.
Without ``WORLD_SIZE`` (or with 1) and no process group already initialized, everything here is
the identity and costs nothing. Limits: a rank that fails (a reward error, an out-of-memory) or
is stopped alone leaves the others waiting in the next collective until torchrun ends them; its
checkpoint (rank 0's) is the last one saved, from which ``run.resume=auto`` continues on any N.
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import torch

from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.checkpoint import checkpoint_name

__all__ = ["DistContext", "NullMetricsLogger", "rank_seed", "group_seed"]

#: Metric names reduced by sum (counts, throughput) and by max (timings, memory); names ending
#: "/min" / "_min" by min, "/max" / "_max" by max; all the others are per-rank means of equal
#: shares, averaged.
_SUM_KEYS = {"tokens_per_s"}
_MAX_KEYS = {"gen_s", "reward_s", "train_s", "step_s", "peak_mem_gib", "completions/max_length",
             "completions/max_terminated_length"}
_MIN_KEYS = {"completions/min_length", "completions/min_terminated_length"}


def rank_seed(seed: int, rank: int) -> int:
    """The sampling seed of ``rank`` for a step whose one-rank seed is ``seed`` (rank 0: ``seed``)."""
    if rank == 0:
        return int(seed)
    return (int(seed) * 1_000_033 + int(rank) * 104_729 + 7) % (2**62)


def group_seed(seed: int, step: int, group: int) -> int:
    """The sampling seed of prompt group ``group`` (its index in the step's global batch) of ``step``."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + int(group) * 15_485_863 + 54_321) % (2**62)


class DistContext:
    """This process's place in the run: ``rank``, ``world_size``, ``local_rank``, ``is_main``."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, backend: Optional[str] = None,
                 owned: bool = False):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend
        self._owned = owned  # this context initialized the process group (close() destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto", prompts_per_step: Optional[int] = None,
                 timeout_s: float = 600.0) -> "DistContext":
        """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
        ``MASTER_ADDR``, ``MASTER_PORT``), or use the one already initialized; one rank otherwise.
        ``device`` is ``run.device``: NCCL for CUDA runs, gloo for CPU ones. ``prompts_per_step``
        given: :meth:`check_batch` before any connection is made."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            ctx = cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                      dist.get_backend())
            if prompts_per_step is not None:
                ctx.check_batch(prompts_per_step)
            return ctx
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ConfigError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (run under torchrun)") from None
        if world <= 1:
            return cls()
        if prompts_per_step is not None:
            cls(rank, world, local).check_batch(prompts_per_step)
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            if local >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are "
                                  f"visible (--nproc-per-node at most the GPU count)")
            torch.cuda.set_device(local)
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, local, backend, owned=True)

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA run of several ranks, else ``device``."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def check_batch(self, prompts_per_step: int) -> int:
        """Prompts per rank; ConfigError unless ``prompts_per_step`` splits evenly."""
        if prompts_per_step % self.world_size:
            raise ConfigError(f"data.prompts_per_step ({prompts_per_step}) must be a multiple of the number of "
                              f"ranks ({self.world_size}): each rank takes an equal share of whole prompt groups")
        return prompts_per_step // self.world_size

    def check_engine(self, engine: str) -> None:
        """ConfigError for an engine not supported on several ranks (vLLM: its own process groups)."""
        if self.enabled and engine != "native":
            raise ConfigError(f"generation.engine={engine} is not supported under torchrun yet (one rank only); "
                              f"use generation.engine=native for data-parallel GRPO")

    def first_group(self, prompts_per_step: int) -> int:
        """The global index of this rank's first prompt in the step's batch."""
        return self.rank * (prompts_per_step // self.world_size)

    def shard(self, examples: Sequence) -> list:
        """This rank's share of the step's prompts (a contiguous run; ``check_batch`` first)."""
        k = len(examples) // self.world_size
        return list(examples[self.rank * k:(self.rank + 1) * k])

    @staticmethod
    def checkpoint_path(output_dir, step: int) -> Path:
        """Where rank 0 writes step ``step``'s checkpoint (what the other ranks note instead of writing)."""
        return Path(output_dir) / checkpoint_name(step)

    # -- collectives (all the identity on one rank) -----------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=op)
        return t

    def _collective_device(self, like: Optional[torch.device] = None) -> torch.device:
        """Where a collective's tensor must live: CUDA for NCCL, the CPU for gloo."""
        if self.backend == "nccl":
            return like if like is not None and like.type == "cuda" else torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def token_count(self, n_items: torch.Tensor) -> torch.Tensor:
        """The divisor of the token-normalized losses on this rank: the global token count / N
        (so that the ranks' losses average to the global loss); ``n_items`` itself on one rank."""
        if not self.enabled:
            return n_items
        import torch.distributed as dist

        t = n_items.detach().to(self._collective_device(n_items.device), torch.float64).reshape(1).clone()
        self._all_reduce(t, dist.ReduceOp.SUM)
        return (t[0] / self.world_size).to(n_items.device, torch.float32)

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Average the ``.grad`` of ``params`` over the ranks, in place (one flat all-reduce per
        dtype); a missing gradient counts as zeros."""
        if not self.enabled:
            return
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dev = flat.device
            flat = flat.to(self._collective_device(dev))
            self._all_reduce(flat, dist.ReduceOp.SUM)
            flat = flat.div_(self.world_size).to(dev)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self._collective_device())
        return bool(self._all_reduce(t, dist.ReduceOp.MAX)[0] > 0)

    def reduce_metrics(self, rec: dict, moments: Optional[dict] = None) -> dict:
        """The step's metrics over all ranks (see the module docstring); ``rec`` on one rank.
        Every rank must pass the same keys (the same config gives them). ``moments``
        (:func:`~compilepass.standby.grpo.step_metrics.reward_moments`): those batch means and
        stds are pooled exactly from each rank's count, sum and sum of squares."""
        if not self.enabled:
            return rec
        out = self._reduce_plain(rec)
        if moments:
            out.update(self._pool_moments(moments))
        return out

    def _pool_moments(self, moments: dict) -> dict:
        import torch.distributed as dist

        names = sorted(moments)
        t = torch.tensor([v for k in names for v in moments[k][1]], dtype=torch.float64,
                         device=self._collective_device())
        self._all_reduce(t, dist.ReduceOp.SUM)
        out = {}
        for i, mean_key in enumerate(names):
            n, total, squares = t[3 * i:3 * i + 3].tolist()
            out[mean_key] = total / n if n else float("nan")
            var = (squares - total * total / n) / (n - 1) if n > 1 else 0.0
            out[moments[mean_key][0]] = math.sqrt(max(var, 0.0))  # unbiased, as TRL's nanstd
        return out

    def _reduce_plain(self, rec: dict) -> dict:
        import torch.distributed as dist

        keys = sorted(k for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        ops: dict[str, list[str]] = {"sum": [], "max": [], "min": [], "mean": []}
        for k in keys:
            if k in _SUM_KEYS:
                ops["sum"].append(k)
            elif k in _MAX_KEYS or k.endswith("/max") or k.endswith("_max"):
                ops["max"].append(k)
            elif k in _MIN_KEYS or k.endswith("/min") or k.endswith("_min"):
                ops["min"].append(k)
            else:
                ops["mean"].append(k)
        out = dict(rec)
        for name, names in ops.items():
            if not names:
                continue
            vals = [float(rec[k]) for k in names]
            if name == "min":  # NaN (a min over no tokens) loses against any number
                vals = [math.inf if math.isnan(v) else v for v in vals]
            elif name == "max":
                vals = [-math.inf if math.isnan(v) else v for v in vals]
            t = torch.tensor(vals, dtype=torch.float64, device=self._collective_device())
            op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                  "min": dist.ReduceOp.MIN}[name]
            self._all_reduce(t, op)
            if name == "mean":
                t /= self.world_size
            for k, v in zip(names, t.tolist()):
                out[k] = float("nan") if math.isinf(v) and name in ("min", "max") else v
                if isinstance(rec[k], int) and name == "sum":
                    out[k] = int(round(v))
        return out

    def close(self) -> None:
        """Leave the process group if this context initialized it."""
        if self._owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class NullMetricsLogger:
    """What ranks other than 0 log through: :class:`~compilepass.standby.grpo.metrics.MetricsLogger`'s
    interface, nothing written (the records are returned as rank 0's logger returns them)."""

    def __init__(self, output_dir=None, **_ignored):
        self._tail: list[dict] = []

    def log(self, step: int, metrics) -> dict:
        record = {"step": int(step), "time": round(time.time(), 3), **{str(k): v for k, v in metrics.items()}}
        self._tail = (self._tail + [record])[-20:]
        return record

    def tail(self, n: int = 5) -> list[dict]:
        return list(self._tail[-n:]) if n > 0 else []

    def close(self) -> None:
        pass
