"""What a finished run leaves: the final adapter in peft format in output_dir (loaded with real
peft onto the base), the tokenizer beside it, and the merged model (in-run and exported later)."""

from __future__ import annotations

import pytest
import torch
from family_helpers import make_family_dir

from compilepass.standby.grpo.config import default_config, load_config
from compilepass.standby.grpo.outputs import ExportError, export_merged
from compilepass.standby.grpo.trainer import GRPOTrainer

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])


def _train(tmp_path, model: str, *overrides):
    cfg = load_config(None, [f"model.name_or_path={model}", f"run.output_dir={tmp_path / 'run'}", "run.max_steps=2",
                             "data.prompts_per_step=2", "generation.num_generations=4",
                             "generation.max_completion_len=6", "optim.lr=0.05", *overrides],
                      base=default_config("tiny"))
    trainer = GRPOTrainer(cfg, progress=False)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    trainer.model.eval()
    return trainer, summary


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_final_adapter_loads_with_peft_and_the_merged_model_matches(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = make_family_dir(tmp_path / "qwen3", "qwen3")
    trainer, summary = _train(tmp_path, str(base_dir), "run.save_merged=true")
    out = tmp_path / "run"
    assert summary.final_adapter == str(out) and summary.merged == str(out / "merged")
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".tmp-final-*"))

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out).eval()
    mine = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert mine.keys() == theirs.keys() and len(mine) > 0
    assert any(float(p.detach().abs().sum()) > 0 for n, p in mine.items() if "lora_B" in n)  # training moved B off zero
    for n in mine:
        assert torch.equal(mine[n].detach().cpu(), theirs[n].detach()), n
    adapter_logits = _logits(loaded)
    torch.testing.assert_close(_logits(trainer.model), adapter_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(loaded.get_base_model().__class__.from_pretrained(base_dir)), adapter_logits)

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), adapter_logits, atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("abc", add_special_tokens=False) == trainer.tokenizer.encode("abc")
    assert AutoTokenizer.from_pretrained(out / "merged").encode("xyz") == tok.encode("xyz")

    # exported later, from the run directory (the CLI), the same merged model
    from compilepass.cli.app import main

    assert main(["export-merged", str(out), "--out", str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(exported), adapter_logits, atol=1e-5, rtol=1e-5)


def test_export_merged_rebuilds_a_presets_base_from_the_run(tmp_path, capsys):
    """A preset's base has no files: export_merged rebuilds it from the run's config (seed,
    model.init_std), so the merged model reproduces the trained policy."""
    from transformers import AutoModelForCausalLM

    trainer, summary = _train(tmp_path, "tiny")
    assert summary.merged is None and not (tmp_path / "run" / "merged").exists()
    path = export_merged(tmp_path / "run")
    assert path == tmp_path / "run" / "merged"
    merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), _logits(trainer.model), atol=1e-5, rtol=1e-5)

    from compilepass.cli.app import main

    capsys.readouterr()
    assert main(["export-merged", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no peft adapter" in err


def test_a_stopped_run_writes_no_final_adapter(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "run.max_steps=3", "data.prompts_per_step=2",
                             "generation.num_generations=2", "generation.max_completion_len=4"],
                      base=default_config("tiny"))
    trainer = GRPOTrainer(cfg, progress=False)
    try:
        trainer.train_step(1)
    finally:
        trainer.close()
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    with pytest.raises(ExportError, match="holds no peft adapter"):
        export_merged(tmp_path / "run")
