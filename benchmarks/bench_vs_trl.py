"""GRPO steps through TRL and through compilepass on the same model, data, reward, LoRA and batch.

    python benchmarks/bench_vs_trl.py --out $OUT/vs_trl.json --model qwen3-0.6b --device-memory-gib 80
    python benchmarks/bench_vs_trl.py --out r.json --smoke        # CPU plumbing check (a tiny model)

Stacks (``--stacks``), each in its own child process on a fresh device (the cap taken first):

- ``trl-hf``: ``trl.GRPOTrainer``, generation with transformers (TRL's default);
- ``trl-vllm``: ``trl.GRPOTrainer`` with ``use_vllm=True, vllm_mode="colocate"`` (when vLLM imports;
  TRL's sleep mode on);
- ``trl-ours``: :class:`compilepass.integrations.trl.GRPOTrainer` (TRL trains, our engine generates,
  our kernel computes the training log-probs);
- ``trl-ours-trl-head``: the same with ``kernel_logprobs=False`` (TRL's own fused head computes them):
  the two beside each other time our log-prob kernel against TRL's inside one trainer;
- ``trl-ours-compiled``: ``trl-ours`` with ``compile_train=True`` (the training forward's body
  compiled with the train entry's flags): what that compile costs and what it gives back per step;
- ``trl-ours-merged``: ``trl-ours`` with ``rollout_engine_options={"merge_lora": True}``;
- ``ours``: ``compilepass grpo``'s trainer (:class:`compilepass.standby.grpo.trainer.GRPOTrainer`);
- ``ours-merged``: the same with ``generation.merge_lora=true`` (the adapters merged into the base
  weights for each generation, the base restored from a host copy after).

Same for all: the model (``--model``: a preset, given random weights and saved as a Hugging Face
directory with a byte-level tokenizer, or a local directory), ``--prompts`` prompts of
``--prompt-len`` bytes x ``--generations`` completions of up to ``--completion-len`` tokens per step,
LoRA rank ``--lora-rank`` on every linear layer, bf16 on CUDA, gradient checkpointing, lr 1e-5, the
reward :func:`distinct_bytes_reward`. Per stack: every step's wall time (raw), the peak device memory
the run used (sampled every 20 ms: visible total minus free, so vLLM's own pools count too), and
with ``--context`` the longest completion that fits: ``--completion-len`` doubled while one step
completes (a new child per length), up to ``--context-max``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_common import dist_version, result_header, run_json_child

STACKS = ("trl-hf", "trl-vllm", "trl-ours", "trl-ours-trl-head", "trl-ours-compiled", "trl-ours-merged", "ours",
          "ours-merged")
OPTIONAL_STACKS = ("trl-ours-compiled", "trl-ours-merged", "ours-merged")  # run only when named


def distinct_bytes_reward(prompts=None, completions=None, *args, **kwargs):
    """Fraction of distinct characters in each completion: cheap, deterministic, has spread."""
    return [len(set(c)) / max(1, len(c)) for c in completions]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--stacks", nargs="*", default=[s for s in STACKS if s not in OPTIONAL_STACKS], choices=STACKS,
                   help="default: all but trl-ours-compiled (its training compile takes minutes on a GPU), "
                        "trl-ours-merged and ours-merged")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per stack (the first includes start-up)")
    p.add_argument("--device-memory-gib", type=float, default=None)
    p.add_argument("--context", action="store_true", help="also the longest completion each stack fits")
    p.add_argument("--context-max", type=int, default=131072)
    p.add_argument("--child-timeout-s", type=float, default=500.0)
    p.add_argument("--smoke", action="store_true", help="CPU, float32, tiny batches: checks the plumbing only")
    p.add_argument("--child", default=None, choices=STACKS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ the model


def prepare_model_dir(name: str, folder: Path) -> Path:
    """A preset with random weights saved as an HF directory with a byte-level tokenizer, or ``name``."""
    if Path(name).is_dir():
        return Path(name)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from compilepass.core.models import build_model

    if name == "smoke":  # the CPU plumbing check: tiny, with room for the tokenizer's 258 ids
        from transformers import AutoModelForCausalLM

        from compilepass.core.shapes import ModelShape

        shape = ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                           intermediate_size=128, vocab_size=320, family="qwen3", tie_word_embeddings=True,
                           max_position_embeddings=512)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(shape.to_hf_config(), dtype=torch.float32)
    else:
        model = build_model(name, dtype=torch.float32, device="cpu", seed=0)
    if model.config.vocab_size < 258:
        raise SystemExit(f"{name}: vocab {model.config.vocab_size} < 258, too small for the byte tokenizer")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: ord(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<eos>"], vocab["<pad>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    model.config.eos_token_id, model.config.pad_token_id = 256, 257
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def prompts_for(n: int, length: int) -> list[str]:
    import random

    rng = random.Random(0)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length)) for _ in range(n)]


# --------------------------------------------------------------------------------------- child side


class PeakSampler:
    """Peak of (visible total - free) device memory, sampled in a thread; CPU: peak RSS."""

    def __init__(self, visible_total: int | None):
        self.visible_total, self.peak, self._stop = visible_total, 0, threading.Event()
        self._thread = None

    def __enter__(self):
        import torch

        if torch.cuda.is_available():
            def loop():
                while not self._stop.is_set():
                    free, _ = torch.cuda.mem_get_info()
                    self.peak = max(self.peak, self.visible_total - free)
                    time.sleep(0.02)

            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        else:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trl_args(args, out_dir: str, vllm: bool):
    import torch
    import trl

    cuda = torch.cuda.is_available()
    kw = dict(output_dir=out_dir, report_to=[], use_cpu=not cuda, bf16=cuda, max_steps=args.steps,
              per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
              max_completion_length=args.completion_len, learning_rate=1e-5, logging_steps=1,
              save_strategy="no", seed=0, gradient_checkpointing=True, temperature=1.0)
    if vllm:
        kw.update(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True)
    return trl.GRPOConfig(**kw)


def run_trl(args, model_dir: str, stack: str) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    if stack == "trl-vllm":
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511").items():
            os.environ.setdefault(k, v)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = model_dir if stack == "trl-vllm" else AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ds = Dataset.from_dict({"prompt": prompts_for(args.prompts * 4, args.prompt_len)})
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear")
    kwargs = dict(model=model, reward_funcs=distinct_bytes_reward, args=_trl_args(args, str(Path(model_dir) / stack),
                  stack == "trl-vllm"), train_dataset=ds, peft_config=lora, callbacks=[StepTimer()])
    if stack.startswith("trl-ours"):
        from compilepass.integrations.trl import GRPOTrainer

        trainer = GRPOTrainer(**kwargs, kernel_logprobs=stack != "trl-ours-trl-head",
                              compile_train=stack == "trl-ours-compiled",
                              rollout_engine_options={"merge_lora": True} if stack == "trl-ours-merged" else None)
    else:
        trainer = trl.GRPOTrainer(**kwargs)
    trainer.train()
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": times, "completion_mean_length": lengths,
            "logprobs_path": getattr(trainer, "logprobs_path", "trl"),
            "merge_lora": getattr(getattr(trainer, "rollout_engine", None), "merge_lora", None)}


def run_ours(args, model_dir: str, merge_lora: bool = False) -> dict:
    import torch

    from compilepass.standby.grpo.config import default_config, load_config
    from compilepass.standby.grpo.trainer import GRPOTrainer

    data = Path(model_dir) / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts_for(args.prompts * 4, args.prompt_len)))
    cuda = torch.cuda.is_available()
    overrides = [f"model.name_or_path={model_dir}", f"model.dtype={'bfloat16' if cuda else 'float32'}",
                 f"model.lora_rank={args.lora_rank}", f"model.lora_alpha={2 * args.lora_rank}",
                 "model.gradient_checkpointing=true", "model.init_std=null", f"data.dataset={data}",
                 f"data.prompts_per_step={args.prompts}", f"generation.num_generations={args.generations}",
                 f"generation.max_prompt_len={args.prompt_len + 8}", f"generation.max_completion_len={args.completion_len}",
                 "optim.lr=1.0e-5", f"reward.functions=[{{name: '{Path(__file__).resolve()}:distinct_bytes_reward'}}]",
                 f"run.max_steps={args.steps}", "run.save_every=0", f"run.output_dir={Path(model_dir) / ('ours-merged' if merge_lora else 'ours')}",
                 f"run.device={'cuda' if cuda else 'cpu'}", f"generation.merge_lora={str(merge_lora).lower()}"]
    config = load_config(None, overrides, base=default_config("tiny"))
    trainer = GRPOTrainer(config, progress=False)
    try:
        summary = trainer.train()
        merged = getattr(trainer.engine, "merge_lora", None)
    finally:
        trainer.close()
    return {"step_s": [m.get("step_s") for m in summary.metrics],
            "completion_mean_length": [m.get("completions/mean_length") for m in summary.metrics],
            "merge_lora": merged}


def run_child(args) -> dict:
    import torch

    cap = None
    if args.device_memory_gib and torch.cuda.is_available():
        from compilepass.standby.memory.cap import DeviceMemoryCap

        cap = DeviceMemoryCap(args.device_memory_gib)
    visible = cap.visible_total if cap is not None else (torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None)
    row: dict = {"cap": cap.describe() if cap is not None else None}
    t0 = time.perf_counter()
    with PeakSampler(visible) as peak:
        if args.child in ("ours", "ours-merged"):
            row.update(run_ours(args, args.model_dir, merge_lora=args.child == "ours-merged"))
        else:
            row.update(run_trl(args, args.model_dir, args.child))
    row["wall_s"] = time.perf_counter() - t0
    row["peak_device_bytes" if torch.cuda.is_available() else "peak_rss_bytes"] = peak.peak
    steady = [s for s in row["step_s"][1:] if s is not None]
    row["steady_step_s_median"] = sorted(steady)[len(steady) // 2] if steady else None
    return row


# -------------------------------------------------------------------------------------- parent side


def _child(args, stack: str, model_dir: Path, completion_len: int, steps: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"vs-trl-{stack}-"))
    cmd = [sys.executable, __file__, "--child", stack, "--model-dir", str(model_dir), "--out", str(tmp / "row.json"),
           "--prompts", str(args.prompts), "--generations", str(args.generations), "--prompt-len", str(args.prompt_len),
           "--completion-len", str(completion_len), "--lora-rank", str(args.lora_rank), "--steps", str(steps)]
    if args.device_memory_gib:
        cmd += ["--device-memory-gib", str(args.device_memory_gib)]
    return run_json_child(cmd, tmp / "row.json", args.child_timeout_s)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        Path(args.out).write_text(json.dumps(run_child(args), indent=1))
        return 0
    if args.smoke:
        args.prompts, args.generations, args.prompt_len, args.completion_len, args.steps = 2, 2, 8, 8, 2
        args.model = "smoke"
    stacks = [s for s in args.stacks if s != "trl-vllm" or dist_version("vllm")]
    result = {**result_header("grpo_vs_trl"), "model": args.model, "prompts": args.prompts, "generations": args.generations,
              "prompt_len": args.prompt_len, "completion_len": args.completion_len, "lora_rank": args.lora_rank,
              "steps": args.steps, "device_memory_gib": args.device_memory_gib,
              "skipped": sorted(set(args.stacks) - set(stacks)), "rows": {}, "context": {}}
    model_dir = prepare_model_dir(args.model, Path(tempfile.mkdtemp(prefix="vs-trl-model-")) / "model")
    for stack in stacks:
        result["rows"][stack] = row = _child(args, stack, model_dir, args.completion_len, args.steps)
        print(stack, json.dumps({k: row.get(k) for k in ("steady_step_s_median", "peak_device_bytes", "error")}),
              flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.context:
        for stack in stacks:
            tried, length = [], args.completion_len
            while length <= args.context_max:
                r = _child(args, stack, model_dir, length, 1)
                tried.append({"completion_len": length, "ok": "error" not in r, "error": r.get("error"),
                              "peak_device_bytes": r.get("peak_device_bytes")})
                if "error" in r:
                    break
                length *= 2
            ok = [t["completion_len"] for t in tried if t["ok"]]
            result["context"][stack] = {"longest_ok": max(ok) if ok else None, "tried": tried}
            print(stack, "context", result["context"][stack]["longest_ok"], flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
