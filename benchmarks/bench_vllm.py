"""Side by side on one GPU: the native engine, ``VllmEngine`` and plain vLLM; vLLM's start with and
without the gc patch.

    python benchmarks/bench_vllm.py --out $OUT/vllm_side_by_side.json          # on a GPU with vLLM
    python benchmarks/bench_vllm.py --out r.json --only native plain-vllm      # a subset

Every row runs in its own child process (a new Inductor cache folder, vLLM's compile cache off with
``VLLM_DISABLE_COMPILE_CACHE=1``; Triton's kernel cache and vLLM's JIT caches stay the machine's, so
run it after one vLLM start on the machine), on the same random-weight model
(``--model`` preset, bf16, seed 0) and the same random prompts; every completion runs to
``--new-tokens`` (EOS ignored). Rows:

- ``native``: :class:`~compilepass.standby.rollout.engine.RolloutEngine` with its defaults
  (``compile_options="auto"``);
- ``vllm-engine``: :class:`~compilepass.standby.rollout.vllm.engine.VllmEngine` (vLLM's default
  compilation, weights shared with the transformers model), plus one sleep/wake: the bytes freed
  (``torch.cuda.mem_get_info``), the KV path used, greedy tokens after the wake equal those before;
- ``plain-vllm``: ``vllm.LLM`` on the same weights saved to a folder, vLLM's defaults
  (``gpu_memory_utilization=0.9``), as a vLLM user would start it;
- ``plain-vllm-logprobs``: plain vLLM asked for what ``VllmEngine`` asks for, the sampled tokens'
  log-probs (``logprobs=0``, ``logprobs_mode="processed_logprobs"``): what those cost on their own
  (session 11 found ``VllmEngine`` at 9.5k tok/s beside plain vLLM's 11.8k);
- ``gc-off`` / ``gc-on``: plain vLLM again with ``--gc-objects`` live Python objects in the process
  (a trainer's heap), without and with :func:`compilepass.gc_patch.patch_vllm_capture`; the time
  inside vLLM's ``capture_model`` is measured by a wrapper around it (start only, no generate).

Per row: ``start_s`` (constructor wall time), ``capture_s`` (vLLM rows), the first generate's time,
``--repeats`` timed generates (raw), tok/s median. The JSON also has the device, versions and this
command.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import add_rollout_shape_args, dist_version

ROWS = ("native", "vllm-engine", "plain-vllm", "plain-vllm-logprobs", "gc-off", "gc-on")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rollout_shape_args(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gc-objects", type=int, default=5_000_000)
    p.add_argument("--only", nargs="*", default=list(ROWS), choices=ROWS)
    p.add_argument("--child-timeout-s", type=float, default=300.0)
    p.add_argument("--child", default=None, choices=ROWS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _model_and_prompts(args):
    import torch

    from compilepass.core.models import build_model
    from compilepass.core.shapes import shape_for

    model = build_model(args.model, dtype=torch.bfloat16, device="cuda", seed=0).eval()
    shape = shape_for(args.model)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, shape.vocab_size, (args.batch, args.prompt_len), generator=gen).tolist()
    return model, prompts


def _timed(generate, repeats: int) -> dict:
    first_t0 = time.perf_counter()
    first = generate()
    first_s = time.perf_counter() - first_t0
    reps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens, ids = generate()
        dt = time.perf_counter() - t0
        reps.append({"s": dt, "tokens": tokens, "tok_per_s": tokens / dt})
    return {"first_generate_s": first_s, "first_tokens": first[0], "repeats": reps,
            "tok_per_s_median": statistics.median(r["tok_per_s"] for r in reps), "last_ids": ids}


def _wrap_capture(box: dict):
    """Time vLLM's ``capture_model`` (outermost wrapper, so it includes any gc patch), on every model
    runner class the installed vLLM has (V1's ``gpu_model_runner`` and 0.26's V2 ``gpu.model_runner``)."""
    import importlib

    for module, cls in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                        ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")):
        try:
            runner = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            continue
        inner = runner.capture_model

        def timed(self, *a, _inner=inner, **k):
            t0 = time.perf_counter()
            try:
                return _inner(self, *a, **k)
            finally:
                box["capture_s"] = box.get("capture_s", 0.0) + time.perf_counter() - t0

        runner.capture_model = timed


def child_native(args) -> dict:
    import torch

    from compilepass.standby.rollout.engine import RolloutEngine

    model, prompts = _model_and_prompts(args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine = RolloutEngine(model, max_batch=args.batch, max_len=args.prompt_len + args.new_tokens,
                           persistent_compile=False)  # a cold start, also on a later repeat
    torch.cuda.synchronize()
    row = {"start_s": time.perf_counter() - t0, "compile_s": engine.compile_s, "capture_s": engine.capture_s}

    def gen():
        out = engine.generate(prompts, max_new_tokens=args.new_tokens, temperature=0.0)
        return int(out.completion_lengths.sum()), out.completion_ids.cpu()

    row.update(_timed(gen, args.repeats))
    row["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    engine.close()
    return row


def child_vllm_engine(args) -> dict:
    import torch

    from compilepass.standby.rollout.vllm.engine import VllmEngine

    model, prompts = _model_and_prompts(args)
    box: dict = {}
    import vllm  # noqa: F401 - import first so the wrapper sits outside the engine's gc patch

    _wrap_capture(box)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine = VllmEngine(model, max_batch=args.batch, max_len=args.prompt_len + args.new_tokens)
    torch.cuda.synchronize()
    row = {"start_s": time.perf_counter() - t0, "capture_s": box.get("capture_s"), "kv_release": engine.kv_release}

    def gen():
        out = engine.generate(prompts, max_new_tokens=args.new_tokens, temperature=0.0)
        return int(out.completion_lengths.sum()), out.completion_ids.cpu()

    row.update(_timed(gen, args.repeats))
    cycles = []
    for _ in range(2):
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        engine.sleep()
        torch.cuda.synchronize()
        sleep_s = time.perf_counter() - t0
        freed = torch.cuda.mem_get_info()[0] - free0
        t0 = time.perf_counter()
        engine.wake()
        torch.cuda.synchronize()
        wake_s = time.perf_counter() - t0
        _, ids = gen()
        cycles.append({"freed_bytes": freed, "sleep_s": sleep_s, "wake_s": wake_s,
                       "same_tokens_after_wake": bool(torch.equal(ids, row["last_ids"]))})
    row["sleep_wake"] = cycles
    row["kv_cache_memory_bytes"] = engine.llm_kwargs.get("kv_cache_memory_bytes")
    row["gc_freeze_sites"] = dict(engine.gc_freeze_sites)  # where vLLM froze the gc heap (each freeze undone)
    if engine._cumem_kv is not None:
        plan = engine._cumem_kv.plan
        row["cumem_plan"] = {"released": len(plan.release), "release_bytes": plan.release_bytes,
                             "kept": sorted(set(plan.kept.values())), "kv_bytes": plan.kv_bytes,
                             "kv_bytes_covered": plan.kv_bytes_covered}
    engine.close()
    return row


def child_plain_vllm(args, gc_mode=None, logprobs=False) -> dict:
    import torch

    model, prompts = _model_and_prompts(args)
    folder = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model.save_pretrained(str(folder))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    keep = None
    row: dict = {}
    if gc_mode is not None:
        keep = [[i] for i in range(args.gc_objects)]  # a trainer's heap: gc-tracked objects
        row["gc_objects"] = len(keep)
        if gc_mode == "on":
            from compilepass.gc_patch import patch_vllm_capture

            row["gc_patch_applied"] = bool(patch_vllm_capture())
    box: dict = {}
    _wrap_capture(box)
    t0 = time.perf_counter()
    llm = vllm.LLM(model=str(folder), skip_tokenizer_init=True, dtype="bfloat16",
                   max_model_len=args.prompt_len + args.new_tokens + 1, max_num_seqs=args.batch, seed=0,
                   enable_prefix_caching=False, load_format="safetensors",
                   **({"logprobs_mode": "processed_logprobs"} if logprobs else {}))
    row.update(start_s=time.perf_counter() - t0, capture_s=box.get("capture_s"), logprobs=logprobs)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                            logprobs=0 if logprobs else None)
    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def gen():
        outs = llm.generate(reqs, params, use_tqdm=False)
        ids = torch.tensor([list(o.outputs[0].token_ids) for o in outs])
        return int(sum(len(o.outputs[0].token_ids) for o in outs)), ids

    if gc_mode is None:
        row.update(_timed(gen, args.repeats))
    else:  # the gc rows measure the engine's start only
        row["last_ids"] = torch.zeros(1, dtype=torch.long)
    del keep
    return row


def run_child(args) -> dict:
    import torch

    name = args.child
    if name == "native":
        row = child_native(args)
    elif name == "vllm-engine":
        row = child_vllm_engine(args)
    elif name == "plain-vllm":
        row = child_plain_vllm(args)
    elif name == "plain-vllm-logprobs":
        row = child_plain_vllm(args, logprobs=True)
    else:
        row = child_plain_vllm(args, gc_mode=name.split("-")[1])
    ids = row.pop("last_ids")
    row["token_checksum"] = int(ids.long().sum())
    row["device"] = torch.cuda.get_device_name()
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        import faulthandler

        # a stuck child prints where it is before the parent kills it
        faulthandler.dump_traceback_later(float(os.environ.get("BENCH_DUMP_S", "185")), repeat=False)
        row = run_child(args)
        Path(args.out).write_text(json.dumps(row, indent=1))
        return 0
    import torch

    result = {"benchmark": "vllm_side_by_side", "command": " ".join(shlex.quote(a) for a in sys.argv),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "versions": {d: dist_version(d) for d in ("torch", "triton", "vllm", "transformers", "peft")},
              "model": args.model, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens,
              "caches": "every row in a new process with a new Inductor cache folder (FX graph and AOT "
                        "autograd caches empty) and vLLM's compile cache off; Triton's kernel cache and "
                        "vLLM's JIT caches are the machine's own (warm after its first vLLM start)",
              "vllm_env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
              "rows": {}}
    for name in args.only:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-vllm-{name}-"))
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_DISABLE_COMPILE_CACHE="1",
                   TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"),
                   BENCH_DUMP_S=str(max(10.0, args.child_timeout_s - 15)))
        cmd = [sys.executable, __file__, "--child", name, "--out", str(tmp / "row.json"), "--model", args.model,
               "--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--new-tokens",
               str(args.new_tokens), "--repeats", str(args.repeats), "--gc-objects", str(args.gc_objects)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout_s)
            ok = proc.returncode == 0 and (tmp / "row.json").exists()
            row = json.loads((tmp / "row.json").read_text()) if ok else {
                "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-12000:]}
        except subprocess.TimeoutExpired as exc:
            row = {"error": f"timed out after {args.child_timeout_s} s",
                   "stderr_tail": (exc.stderr or b"")[-12000:].decode(errors="replace")
                   if isinstance(exc.stderr, bytes) else str(exc.stderr)[-12000:]}
        row["process_s"] = time.perf_counter() - t0
        result["rows"][name] = row
        Path(args.out).write_text(json.dumps(result, indent=1))
        brief = {k: row.get(k) for k in ("start_s", "capture_s", "tok_per_s_median", "error")}
        print(name, json.dumps(brief), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
