"""TRL's two prompt formats, how each is tokenized, and the format completions reach the rewards in.

- **standard**: ``prompt`` is a non-empty string, encoded as it is (with the tokenizer's special
  tokens for a Hugging Face tokenizer, none for the toy one); completions reach the rewards as
  strings.
- **conversational**: ``prompt`` is a non-empty list of ``{"role": str, "content": str}`` messages,
  rendered with the tokenizer's chat template (``add_generation_prompt=True`` and
  ``data.chat_template_kwargs``, e.g. ``{enable_thinking: false}``); completions reach the rewards
  as ``[{"role": "assistant", "content": text}]``, as TRL hands them.

A dataset holds one format (:func:`dataset_format` refuses a mix, naming the row). A
conversational dataset needs a tokenizer with a chat template: the toy tokenizer of the presets has
none, and :func:`check_tokenizer` says so in one line (no fallback template is made up).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.dataset_files import DatasetError

__all__ = ["STANDARD", "CONVERSATIONAL", "prompt_format", "dataset_format", "check_tokenizer", "encode_prompt",
           "completions_in_format", "prompt_text", "has_chat_template"]

STANDARD = "standard"
CONVERSATIONAL = "conversational"


def prompt_format(prompt: Any) -> Optional[str]:
    """STANDARD, CONVERSATIONAL, or None for a value that is neither (an empty string or list too)."""
    if isinstance(prompt, str):
        return STANDARD if prompt else None
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return CONVERSATIONAL
    return None


def _why_not(prompt: Any) -> str:
    if isinstance(prompt, str) or prompt is None:
        return "is empty" if prompt == "" else "is missing (null)"
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            return "is an empty list of messages"
        for j, m in enumerate(prompt):
            if not isinstance(m, Mapping):
                return f"message {j} is {type(m).__name__}, not a {{role, content}} mapping"
            if not isinstance(m.get("role"), str):
                return f"message {j} has no string 'role'"
            if not isinstance(m.get("content"), str):
                return f"message {j} has no string 'content' (only text messages are supported)"
    return f"is {type(prompt).__name__}"


def dataset_format(prompts: Iterable[Any], where: Callable[[int], str]) -> str:
    """The one format of all ``prompts``; DatasetError naming ``where(row)``
    (e.g. ``"d.jsonl:4"``) for a bad prompt or a row whose format differs from row 0's."""
    first: Optional[str] = None
    for i, prompt in enumerate(prompts):
        fmt = prompt_format(prompt)
        if fmt is None:
            raise DatasetError(f"{where(i)}: \"prompt\" must be a non-empty string or a list of "
                               f"{{role, content}} messages; it {_why_not(prompt)}")
        if first is None:
            first = fmt
        elif fmt != first:
            raise DatasetError(f"{where(i)}: \"prompt\" is {fmt} but row 0's is {first}; one dataset holds one format")
    if first is None:
        raise DatasetError(f"{where(0)}: no examples")
    return first


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` (ours: ToyTokenizer / HFTokenizer) can render conversations."""
    hf = getattr(tokenizer, "hf", None)
    return hf is not None and getattr(hf, "chat_template", None) is not None


def check_tokenizer(fmt: str, tokenizer, model: str) -> None:
    """ConfigError (one line) when the prompts are conversational and ``tokenizer`` has no chat template."""
    if fmt == CONVERSATIONAL and not has_chat_template(tokenizer):
        what = "the toy tokenizer of preset" if getattr(tokenizer, "hf", None) is None else "the tokenizer of"
        raise ConfigError(f"the dataset's prompts are conversational (lists of {{role, content}} messages) but "
                          f"{what} {model!r} has no chat template to render them; use a model whose tokenizer "
                          f"has one, or string prompts")


def encode_prompt(tokenizer, prompt: Any, chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> list[int]:
    """Token ids of one prompt: a string encoded as it is, messages through the chat template."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=hasattr(tokenizer, "hf")))
    messages = [dict(m) for m in prompt]
    try:
        out = tokenizer.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               **dict(chat_template_kwargs or {}))
    except Exception as e:  # noqa: BLE001 - a template's own raise_exception / jinja errors: one line
        text = " ".join(str(e).split())
        raise ConfigError(f"the chat template cannot render the prompt {prompt_text(prompt)[:60]!r}: "
                          f"{type(e).__name__}: {text[:200]}") from None
    ids = out["input_ids"]
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def completions_in_format(texts: Sequence[str], fmt: str) -> list:
    """Decoded completions as the rewards receive them for prompts of format ``fmt``."""
    if fmt == CONVERSATIONAL:
        return [[{"role": "assistant", "content": t}] for t in texts]
    return list(texts)


def prompt_text(prompt: Any) -> str:
    """A prompt as text for messages: a string itself, messages their last message's content."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[-1], Mapping):
        return str(prompt[-1].get("content", ""))
    return str(prompt)
