"""Triton kernels that never materialize logits, each beside its PyTorch reference.

Entry points (dispatching per call, see :mod:`compilepass.kernels.dispatch`):

* :func:`selective_log_softmax` - per-token log-probs from hidden states and the lm_head weight;
* :func:`grpo_loss` - the GRPO policy loss (grpo / bnpo / dr_grpo / dapo / cispo; token- or
  sequence-level (GSPO) importance weights; an optional rollout IS weight) and its metrics;
* :func:`fused_head_grpo_loss` - that loss straight from hidden states and a trained lm_head, its
  gradients computed in the head's one pass (token-level weights only; no dispatch: PyTorch GEMMs).

Implementations: ``logprobs`` (reference, chunked PyTorch, Triton) and ``grpo_loss`` (reference,
Triton). Triton is imported only when a Triton path runs.
"""

if __name__ != "compilepass.kernels":
    # This folder was imported as the top-level ``kernels``: the repository root is on sys.path
    # (``python -m ...`` or ``python -m pytest`` from a checkout). That name belongs to the Hugging Face
    # distribution ``kernels``, which transformers imports when it is installed: hand the import over
    # to it (the rest of sys.path). Without it, stay an empty module: transformers (5.19) imports a
    # ``kernels`` that has no distribution metadata to read its ``__version__``, finds none and moves
    # on, where an ImportError here would end ``import transformers``.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _rest = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _rest)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
else:
    from .dispatch import BACKENDS, ENV_VAR, backend_for, grpo_loss, selective_log_softmax
    from .fused_head_loss import fused_head_grpo_loss
    from .grpo_loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, grpo_loss_reference, grpo_loss_triton
    from .logprobs import (
        selective_log_softmax_chunked,
        selective_log_softmax_reference,
        selective_log_softmax_triton,
    )

    __all__ = [
        "selective_log_softmax",
        "grpo_loss",
        "fused_head_grpo_loss",
        "backend_for",
        "ENV_VAR",
        "BACKENDS",
        "LOSS_TYPES",
        "IMPORTANCE_SAMPLING_LEVELS",
        "selective_log_softmax_reference",
        "selective_log_softmax_chunked",
        "selective_log_softmax_triton",
        "grpo_loss_reference",
        "grpo_loss_triton",
    ]
