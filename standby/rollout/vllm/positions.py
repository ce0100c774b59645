"""Engine lengths past a model config's ``max_position_embeddings``.

vLLM refuses a ``max_model_len`` above the config's ``max_position_embeddings`` (a pydantic
ValidationError from ``ModelConfig``), and its rotary embeddings precompute their cos/sin table up to
that many positions only. The trainer (transformers) and the native engine compute rotary angles
for any position, so a long-context run (``bench context`` at 131,072 completion tokens on a
131,072-position Llama 3.1) trains and generates there. :func:`position_overrides` gives vLLM the
same range: ``hf_overrides={"max_position_embeddings": n}``, which only lengthens the table, for the
rope types whose angles do not depend on that number. For the others (dynamic NTK, YaRN, LongRoPE
...) a larger ``max_position_embeddings`` would change the angles of every position, so the engine
refuses with the reason instead.
"""

from __future__ import annotations

from compilepass.core.errors import ConfigError

#: Rope types whose angles ignore ``max_position_embeddings`` (transformers' ``rope_type`` names):
#: the plain one, linear position scaling, and Llama 3's (it reads ``original_max_position_embeddings``).
LENGTH_FREE_ROPE_TYPES = ("default", "linear", "llama3")


def rope_types(config) -> set[str]:
    """The rope types a transformers config names (``rope_parameters``, or ``rope_scaling`` on older
    transformers; per layer type where the parameters are nested), "default" when none."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    groups = [v for v in params.values() if isinstance(v, dict)] if isinstance(params, dict) else []
    groups = groups or [params if isinstance(params, dict) else {}]
    return {str(g.get("rope_type", g.get("type", "default")) or "default") for g in groups}


def position_overrides(config, max_model_len: int) -> dict:
    """``hf_overrides`` that let vLLM run ``max_model_len`` positions: {} when the config already
    covers them; ``{"max_position_embeddings": max_model_len}`` for a length-free rope type;
    ConfigError otherwise."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or max_model_len <= int(limit):
        return {}
    kinds = rope_types(config)
    other = sorted(kinds - set(LENGTH_FREE_ROPE_TYPES))
    if other:
        raise ConfigError(f"the vLLM engine needs {max_model_len} positions and this model's config has "
                          f"max_position_embeddings={limit} with rope type {', '.join(other)}, whose angles "
                          f"depend on that number: raising it would change every position's rotary "
                          f"embedding; use the native engine, or at most {int(limit) - 1} prompt and completion tokens")
    return {"max_position_embeddings": int(max_model_len)}
