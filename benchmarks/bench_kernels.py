"""Benchmark per-token log-probs + GRPO loss, forward and backward, three ways, on one GPU.

    python3 benchmarks/bench_kernels.py --out $OUT/kernels_bench.json     # H100: estimated 5-6 minutes
    python3 benchmarks/bench_kernels.py --smoke --out /tmp/kb.json         # CPU logic check, ~1 minute

Never run on a GPU before its first real run (written on a CPU-only machine): the smoke mode and
tests/test_kernels_bench.py check its logic; the kernels were compiled for sm_90 ahead of time.

Methods (same inputs, same loss definition: dapo, beta=0.04 with reference log-probs, on-policy):
  pytorch  materialized logits: selective_log_softmax_reference + grpo_loss_reference
  liger    liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (compiled=True, chunk_size=1), if importable
  ours     selective_log_softmax_triton + grpo_loss_triton
  fused    kernels/fused_head_loss.py: the loss and its gradients inside the head's pass (three GEMMs
           with a trained head, against ours' four; a [chunk x vocab] float32 logits buffer), its two
           passes over that buffer in our Triton kernels on CUDA (impl="auto")
  fused-torch  the same with those passes in PyTorch's ops (impl="torch"), 1 GiB chunks

Cases: tokens in {16384, 32768} (sequences of --seq-len tokens) x hidden in {4096, 5120} x vocab in
{151936, 128256}, bf16 hidden and lm_head weight, weight frozen as under LoRA; plus one case at
32768 x 4096 x 151936 with weight.requires_grad=True. Random weights.

Per method and case:
  * fwd_bwd_ms: raw CUDA-event times of forward + backward, --repeats rounds after --warmup calls,
    methods interleaved round by round (A B C A B C ...); medians next to the raw lists;
  * peak_extra_bytes: torch.cuda.max_memory_allocated() during one forward + backward, after
    reset_peak_memory_stats, minus the memory allocated before the call (inputs: hidden, weight,
    ids, mask, advantages, ref log-probs). It includes the gradients the call produces;
  * fwd_nograd_ms / fwd_nograd_peak_extra_bytes: log-probs under torch.no_grad() (how old/ref
    log-probs are computed), pytorch and ours only;
  * the loss value and a slice of the gradients, compared against pytorch (max relative error).
Out of memory is recorded as status "oom", any other exception as "error" with its traceback;
a case predicted to end after --budget-s (default 400 s) is not started and is recorded as
"not_run" with the reason. Before the
cases, small correctness checks of the compiled kernels against the float32 reference.
Everything goes to one JSON file (--out, default $OUT/kernels_bench.json); a table is printed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback

import torch

from compilepass.kernels._triton_support import _MM_OUT_DTYPE_OK, tuning_report
from compilepass.kernels.fused_head_loss import fused_head_grpo_loss
from compilepass.kernels.grpo_loss import grpo_loss_reference, grpo_loss_triton
from compilepass.kernels.logprobs import (
    cuda_candidates,
    selective_log_softmax_reference,
    selective_log_softmax_triton,
)

GiB = 1 << 30
MiB = 1 << 20

LOSS_KW = dict(epsilon_low=0.2, epsilon_high=0.2, beta=0.04, loss_type="dapo")
TEMPERATURE = 1.0


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Methods: each returns (loss, metrics) from (hidden [B,T,H], weight, ids [B,T], mask, adv, ref_logp)
# --------------------------------------------------------------------------------------------------


def run_pytorch(inp):
    logp = selective_log_softmax_reference(inp["hidden"], inp["weight"], inp["ids"], TEMPERATURE)
    return grpo_loss_reference(logp, None, inp["ref"], inp["adv"], inp["mask"], **LOSS_KW)


def run_ours(inp):
    logp = selective_log_softmax_triton(inp["hidden"], inp["weight"], inp["ids"], TEMPERATURE)
    return grpo_loss_triton(logp, None, inp["ref"], inp["adv"], inp["mask"], **LOSS_KW)


def run_fused(inp, **kw):
    """The loss inside the head's pass (kernels/fused_head_loss.py): three GEMMs with a trained head."""
    loss, _ = fused_head_grpo_loss(inp["hidden"], inp["weight"], inp["ids"], TEMPERATURE, None, inp["ref"], inp["adv"],
                                   inp["mask"], **LOSS_KW, **kw)
    return loss, {}


def run_fused_torch(inp):
    """run_fused with PyTorch's ops over the logits buffer and session 9's 1 GiB chunks (its H200 baseline)."""
    return run_fused(inp, impl="torch", chunk_bytes=1 << 30)


def nograd_pytorch(inp):
    return selective_log_softmax_reference(inp["hidden"], inp["weight"], inp["ids"], TEMPERATURE)


def nograd_ours(inp):
    return selective_log_softmax_triton(inp["hidden"], inp["weight"], inp["ids"], TEMPERATURE)


class LigerMethod:
    """LigerFusedLinearGRPOLoss with the same loss settings; built once, import errors kept."""

    def __init__(self, compiled: bool):
        self.error = None
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as exc:  # noqa: BLE001 - report exactly why
            self.error = f"liger-kernel not importable: {type(exc).__name__}: {exc}"
            return
        self.cls = LigerFusedLinearGRPOLoss
        self.compiled = compiled
        self.modules = {}

    def __call__(self, inp):
        T = inp["ids"].shape[1]
        mod = self.modules.get(T)
        if mod is None:
            mod = self.cls(beta=LOSS_KW["beta"], compiled=self.compiled, use_ref_model=True, chunk_size=1,
                           epsilon_low=LOSS_KW["epsilon_low"], epsilon_high=LOSS_KW["epsilon_high"],
                           loss_type=LOSS_KW["loss_type"], max_completion_length=T, temperature=TEMPERATURE)
            self.modules[T] = mod
        loss, metrics = mod(inp["hidden"], inp["weight"], inp["ids"], inp["mask"], inp["adv"],
                            ref_per_token_logps=inp["ref"], old_per_token_logps=None)
        return loss, metrics


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def make_inputs(tokens, hidden, vocab, seq_len, weight_grad, device, dtype, seed=0):
    """Random inputs generated on the device (fast for a 152K x 5120 weight), in the benchmark dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    B = max(1, tokens // seq_len)
    T = tokens // B
    kw = dict(generator=g, device=device)
    h = torch.randn(B, T, hidden, dtype=dtype, **kw)
    w = torch.randn(vocab, hidden, dtype=dtype, **kw).mul_(2.0 / math.sqrt(hidden))  # logits with std ~2
    ids = torch.randint(0, vocab, (B, T), **kw)
    lengths = torch.randint(T // 2, T + 1, (B,), **kw)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()
    adv = torch.randn(B, **kw)
    ref = torch.randn(B, T, **kw).mul_(0.1).add_(-math.log(vocab))
    h.requires_grad_(True)
    w.requires_grad_(weight_grad)
    return {"hidden": h, "weight": w, "ids": ids, "mask": mask, "adv": adv, "ref": ref, "B": B, "T": T}


def _clear_grads(inp):
    inp["hidden"].grad = None
    inp["weight"].grad = None


class Timer:
    def __init__(self, device):
        self.device = device

    def __call__(self, fn):
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), out
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out


def _fwd_bwd(method, inp):
    def go():
        loss, _ = method(inp)
        loss.backward()
        return loss.detach()

    return go


def _peak_extra(device, fn):
    """(peak bytes allocated during fn above what was allocated before it, fn's result)."""
    if device.type != "cuda":
        return None, fn()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base, out


def _status_of(exc: BaseException) -> str:
    return "oom" if isinstance(exc, torch.OutOfMemoryError) else "error"


def _record_failure(rec, exc):
    rec["status"] = _status_of(exc)
    rec["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    if rec["status"] == "error":
        rec["traceback"] = traceback.format_exc()[-6000:]


def _grad_sample(inp, rows=128):
    out = {"hidden": inp["hidden"].grad.reshape(-1, inp["hidden"].shape[-1])[:rows].float().cpu()}
    if inp["weight"].grad is not None:
        out["weight"] = inp["weight"].grad[:rows].float().cpu()
    return out


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def bench_case(case, methods, args, device, dtype, timer):
    tokens, hidden, vocab, weight_grad = case
    rec = {"tokens": tokens, "hidden": hidden, "vocab": vocab, "weight_requires_grad": weight_grad,
           "dtype": str(dtype), "methods": {}}
    try:
        inp = make_inputs(tokens, hidden, vocab, args.seq_len, weight_grad, device, dtype, seed=args.seed)
    except Exception as exc:  # noqa: BLE001
        rec["status"] = _status_of(exc)
        rec["error"] = f"{type(exc).__name__}: {exc}"
        return rec
    rec["batch"], rec["seq_len"] = inp["B"], inp["T"]
    rec["input_bytes"] = sum(t.numel() * t.element_size() for k, t in inp.items() if isinstance(t, torch.Tensor))
    live = {}
    samples = {}
    # 1. warm up (compile, autotune), measure peak memory once, keep loss and gradient slice
    for name, method in methods.items():
        mrec = rec["methods"].setdefault(name, {"status": "ok", "fwd_bwd_ms": []})
        if getattr(method, "error", None):
            mrec.update(status="unavailable", error=method.error)
            continue
        try:
            t_warm = []
            for _ in range(args.warmup):
                _clear_grads(inp)
                ms, _ = timer(_fwd_bwd(method, inp))
                t_warm.append(ms)
            mrec["warmup_ms"] = t_warm
            _clear_grads(inp)
            _cleanup(device)
            peak, loss = _peak_extra(device, _fwd_bwd(method, inp))
            mrec["peak_extra_bytes"] = peak
            mrec["loss"] = float(loss)
            samples[name] = _grad_sample(inp)
            live[name] = method
        except Exception as exc:  # noqa: BLE001
            _record_failure(mrec, exc)
        finally:
            _clear_grads(inp)
            _cleanup(device)
    # 2. interleaved timing rounds
    for _ in range(args.repeats):
        for name, method in list(live.items()):
            mrec = rec["methods"][name]
            try:
                _clear_grads(inp)
                ms, _ = timer(_fwd_bwd(method, inp))
                mrec["fwd_bwd_ms"].append(ms)
            except Exception as exc:  # noqa: BLE001
                _record_failure(mrec, exc)
                live.pop(name)
                _clear_grads(inp)
                _cleanup(device)
    _clear_grads(inp)
    for name, mrec in rec["methods"].items():
        if mrec["fwd_bwd_ms"]:
            mrec["fwd_bwd_ms_median"] = statistics.median(mrec["fwd_bwd_ms"])
    # 3. forward without grad (log-probs of the old / reference policy)
    for name, fn in (("pytorch", nograd_pytorch), ("ours", nograd_ours)):
        if name not in rec["methods"]:
            continue
        mrec = rec["methods"][name]
        try:
            with torch.no_grad():
                for _ in range(args.warmup):
                    timer(lambda: fn(inp))
                _cleanup(device)
                mrec["fwd_nograd_peak_extra_bytes"], _ = _peak_extra(device, lambda: fn(inp))
                mrec["fwd_nograd_ms"] = [timer(lambda: fn(inp))[0] for _ in range(args.repeats)]
            mrec["fwd_nograd_ms_median"] = statistics.median(mrec["fwd_nograd_ms"])
        except Exception as exc:  # noqa: BLE001
            mrec["fwd_nograd_status"] = _status_of(exc)
            mrec["fwd_nograd_error"] = f"{type(exc).__name__}: {str(exc)[:1000]}"
        finally:
            _cleanup(device)
    # 4. agreement with the materialized version (loss, first 128 rows of the gradients)
    checks = {}
    if "pytorch" in samples:
        ref_loss = rec["methods"]["pytorch"]["loss"]
        for name in samples:
            if name == "pytorch":
                continue
            c = {"loss_abs_diff": abs(rec["methods"][name]["loss"] - ref_loss),
                 "loss_rel_diff": abs(rec["methods"][name]["loss"] - ref_loss) / max(abs(ref_loss), 1e-30),
                 "grad_hidden_rel_max_err": _rel_err(samples[name]["hidden"], samples["pytorch"]["hidden"])}
            if "weight" in samples["pytorch"] and "weight" in samples[name]:
                c["grad_weight_rel_max_err"] = _rel_err(samples[name]["weight"], samples["pytorch"]["weight"])
            checks[f"{name}_vs_pytorch"] = c
    rec["checks"] = checks
    # 5. ratios against pytorch in this run
    ratios = {}
    base = rec["methods"].get("pytorch", {})
    for name, mrec in rec["methods"].items():
        if name == "pytorch":
            continue
        r = {}
        if base.get("fwd_bwd_ms_median") and mrec.get("fwd_bwd_ms_median"):
            r["time_vs_pytorch"] = mrec["fwd_bwd_ms_median"] / base["fwd_bwd_ms_median"]
        if base.get("peak_extra_bytes") and mrec.get("peak_extra_bytes") is not None:
            r["peak_vs_pytorch"] = mrec["peak_extra_bytes"] / base["peak_extra_bytes"]
        ratios[name] = r
    liger, ours = rec["methods"].get("liger", {}), rec["methods"].get("ours", {})
    if liger.get("fwd_bwd_ms_median") and ours.get("fwd_bwd_ms_median"):
        ratios.setdefault("ours", {})["time_vs_liger"] = ours["fwd_bwd_ms_median"] / liger["fwd_bwd_ms_median"]
    if liger.get("peak_extra_bytes") and ours.get("peak_extra_bytes") is not None:
        ratios.setdefault("ours", {})["peak_vs_liger"] = ours["peak_extra_bytes"] / liger["peak_extra_bytes"]
    rec["ratios"] = ratios
    return rec


def correctness_checks(device, shapes=((1, 64, 1000), (777, 200, 5003), (4096, 512, 32000))):
    """Compiled kernels vs the float32 reference on small odd shapes (before any timing)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for weight_grad in (False, True):
            for n, hdim, vocab in shapes:
                rec = {"n": n, "hidden": hdim, "vocab": vocab, "dtype": str(dtype), "weight_grad": weight_grad,
                       "temperature": 0.9}
                try:
                    g = torch.Generator().manual_seed(n)
                    h = torch.randn(n, hdim, generator=g).to(device, dtype).requires_grad_(True)
                    w = (torch.randn(vocab, hdim, generator=g) * (3 / math.sqrt(hdim))).to(device, dtype)
                    w.requires_grad_(weight_grad)
                    ids = torch.randint(0, vocab, (n,), generator=g).to(device)
                    up = torch.randn(n, generator=g).to(device)
                    hr = h.detach().float().requires_grad_(True)
                    wr = w.detach().float().requires_grad_(weight_grad)
                    ref = selective_log_softmax_reference(hr, wr, ids, 0.9)
                    ref.backward(up)
                    out_t = selective_log_softmax_triton(h, w, ids, 0.9, token_chunk=1024, vocab_chunk=8192,
                                                         config=cuda_candidates(dtype)[0])
                    out_t.backward(up)
                    rec["logp_max_abs_err"] = float((out_t.detach() - ref.detach()).abs().max())
                    rec["grad_hidden_rel_max_err"] = _rel_err(h.grad.float(), hr.grad)
                    rec["weight_grad_is_none"] = w.grad is None
                    if weight_grad:
                        rec["grad_weight_rel_max_err"] = _rel_err(w.grad.float(), wr.grad)
                    tol_out, tol_grad = (1e-3, 1e-3) if dtype == torch.float32 else (2e-3, 2e-2)
                    rec["ok"] = (rec["logp_max_abs_err"] < tol_out and rec["grad_hidden_rel_max_err"] < tol_grad
                                 and rec.get("grad_weight_rel_max_err", 0.0) < tol_grad
                                 and (weight_grad or rec["weight_grad_is_none"]))
                except Exception as exc:  # noqa: BLE001
                    rec["ok"] = False
                    _record_failure(rec, exc)
                out.append(rec)
                _cleanup(device)
    # GRPO loss kernel
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        rec = {"grpo_loss": loss_type}
        try:
            g = torch.Generator().manual_seed(1)
            lp = (-torch.rand(16, 1000, generator=g) * 4).to(device)
            old = lp + 0.3 * torch.randn(16, 1000, generator=g).to(device)
            refl = lp + 0.2 * torch.randn(16, 1000, generator=g).to(device)
            adv = torch.randn(16, generator=g).to(device)
            mask = (torch.rand(16, 1000, generator=g) > 0.2).float().to(device)
            mask[3] = 0
            res = []
            for fn in (grpo_loss_reference, grpo_loss_triton):
                x = lp.clone().requires_grad_(True)
                loss, metrics = fn(x, old, refl, adv, mask, beta=0.04, loss_type=loss_type)
                loss.backward()
                res.append((loss.detach(), x.grad, metrics))
            rec["loss_abs_err"] = float((res[0][0] - res[1][0]).abs())
            rec["grad_rel_max_err"] = _rel_err(res[1][1], res[0][1])
            rec["metrics_max_abs_err"] = max(float((res[0][2][k] - res[1][2][k]).abs()) for k in res[0][2])
            rec["ok"] = (rec["loss_abs_err"] < 1e-5 and rec["grad_rel_max_err"] < 1e-4
                         and rec["metrics_max_abs_err"] < 1e-6)
        except Exception as exc:  # noqa: BLE001
            rec["ok"] = False
            _record_failure(rec, exc)
        out.append(rec)
    return out


def _fmt_bytes(b):
    return "-" if b is None else f"{b / GiB:7.2f}"


def print_table(results):
    print()
    print(f"{'case':<30} {'method':<8} {'status':<11} {'fwd+bwd ms':>10} {'peak GiB':>9} {'t/pytorch':>9} "
          f"{'mem/pytorch':>11} {'nograd ms':>9}")
    for rec in results["cases"]:
        label = f"{rec['tokens']}x{rec['hidden']}x{rec['vocab']}" + (" +dW" if rec["weight_requires_grad"] else "")
        if "methods" not in rec or not rec["methods"]:
            print(f"{label:<30} {'-':<8} {rec.get('status', '?'):<11} {rec.get('error', '')[:60]}")
            continue
        for name, m in rec["methods"].items():
            r = rec.get("ratios", {}).get(name, {})
            med = m.get("fwd_bwd_ms_median")
            ng = m.get("fwd_nograd_ms_median")
            print(f"{label:<30} {name:<8} {m.get('status', '?'):<11} {('%.1f' % med) if med else '-':>10} "
                  f"{_fmt_bytes(m.get('peak_extra_bytes')):>9} "
                  f"{('%.3f' % r['time_vs_pytorch']) if 'time_vs_pytorch' in r else '-':>9} "
                  f"{('%.4f' % r['peak_vs_pytorch']) if 'peak_vs_pytorch' in r else '-':>11} "
                  f"{('%.1f' % ng) if ng else '-':>9}")
        for k, c in rec.get("checks", {}).items():
            print(f"{'':<30} {k}: " + ", ".join(f"{a}={b:.2e}" for a, b in c.items()))
        ours = rec.get("ratios", {}).get("ours", {})
        vs = [f"{k[:4]} x{ours[k]:.3f}" for k in ("time_vs_liger", "peak_vs_liger") if k in ours]
        if vs:
            print(f"{'':<30} ours vs liger: " + ", ".join(vs))
    bad = [c for c in results.get("correctness", []) if not c.get("ok")]
    print(f"\ncorrectness checks: {len(results.get('correctness', [])) - len(bad)} ok, {len(bad)} failed")
    for c in bad:
        print("  FAILED:", {k: v for k, v in c.items() if k != "traceback"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON path (default $OUT/kernels_bench.json)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter), logic check only")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per method (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per method before measuring")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; smoke 16)")
    p.add_argument("--only", default=None, help="comma-separated cases TOKENSxHIDDENxVOCAB[+dW] to run")
    p.add_argument("--methods", default="pytorch,liger,ours,fused")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="a case predicted to end after this many seconds is not started (recorded as not_run)")
    p.add_argument("--no-correctness", action="store_true", help="skip the small correctness checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tf32", action="store_true", help="torch.backends.cuda.matmul.allow_tf32 = True (fp32 GEMMs)")
    args = p.parse_args(argv)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    t_start = time.time()
    if args.smoke:
        device = torch.device("cpu")
        cases = [(t, h, v, False) for t in (48, 64) for h in (32, 40) for v in (300, 257)] + [(64, 32, 300, True)]
        args.repeats = args.repeats or 2
        args.warmup = min(args.warmup, 1)
        args.seq_len = args.seq_len or 16
        liger_compiled = False
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_kernels.py: no CUDA device (use --smoke for the CPU logic check)")
        device = torch.device("cuda")
        # the headline case (32K tokens, Qwen vocab, LoRA) and the weight-gradient case first, so that
        # the time budget, if it bites, drops the least important ones
        cases = [(32768, 4096, 151936, False), (32768, 4096, 151936, True)]
        cases += [(t, h, v, False) for t in (16384, 32768) for h in (4096, 5120) for v in (151936, 128256)
                  if (t, h, v) != (32768, 4096, 151936)]
        args.repeats = args.repeats or 10
        args.seq_len = args.seq_len or 2048
        liger_compiled = True
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        cases = [c for c in cases if f"{c[0]}x{c[1]}x{c[2]}" + ("+dW" if c[3] else "") in wanted]
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "kernels_bench.json")

    all_methods = {"pytorch": run_pytorch, "liger": LigerMethod(compiled=liger_compiled), "ours": run_ours,
                   "fused": run_fused, "fused-torch": run_fused_torch}
    methods = {k: all_methods[k] for k in args.methods.split(",")}
    if "liger" in methods and methods["liger"].error:
        print(f"NOTE: {methods['liger'].error} -- liger is recorded as unavailable in every case", flush=True)

    dtype = torch.bfloat16
    results = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "cwd": os.getcwd(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu:" + (platform.processor() or
                                                                                          platform.machine()),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
                     "liger_kernel": _version("liger-kernel"), "compilepass": _version("compilepass"),
                     "python": platform.python_version()},
        "random_weights": True,
        "settings": {"dtype": str(dtype), "temperature": TEMPERATURE, **LOSS_KW, "old_logp": "None (on-policy)",
                     "seq_len": args.seq_len, "repeats": args.repeats, "warmup": args.warmup,
                     "interleaved": True, "liger_compiled": liger_compiled, "liger_chunk_size": 1,
                     "float32_matmul_precision": torch.get_float32_matmul_precision(),
                     "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "env": {k: os.environ.get(k) for k in ("COMPILEPASS_KERNELS_TUNE", "TRITON_INTERPRET",
                                                            "PYTORCH_CUDA_ALLOC_CONF")}},
        "peak_definition": "max_memory_allocated during one forward+backward minus memory_allocated before it; "
                           "includes the produced gradients (hidden.grad, weight.grad)",
        "notes": [
            "pytorch and liger compute the lm_head matmul in bf16 and round the logits to bf16 before the "
            "float32 softmax; ours accumulates logits in fp32 and never rounds them, so its loss differs "
            "from pytorch's by that rounding (see correctness for both against a float32 oracle)",
            "liger's backward multiplies float32 grad_logits by weight.float(): an fp32 GEMM, whose speed "
            "depends on float32_matmul_precision / allow_tf32 (recorded in settings; --tf32 turns TF32 on)",
        ],
        "cases": [],
    }

    def dump():
        results["elapsed_s"] = time.time() - t_start
        results["tuning"] = tuning_report()
        results["mm_out_dtype_fp32_available"] = dict(_MM_OUT_DTYPE_OK)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(tmp, out_path)

    if not args.no_correctness:
        print("correctness checks of the kernels against the float32 reference ...", flush=True)
        shapes = ((1, 16, 50), (33, 40, 300)) if args.smoke else ((1, 64, 1000), (777, 200, 5003), (4096, 512, 32000))
        results["correctness"] = correctness_checks(device, shapes)
        dump()

    timer = Timer(device)
    walls = []  # (work ~ tokens * hidden * vocab, wall seconds) of finished cases
    for case in cases:
        label = f"{case[0]}x{case[1]}x{case[2]}" + (" +dW" if case[3] else "")
        work = case[0] * case[1] * case[2]
        # predicted wall time: the slowest finished case per unit of work (the first case also paid
        # for compilation, so this errs on the long side)
        predicted = max((w_s / w for w, w_s in walls), default=0.0) * work
        elapsed = time.time() - t_start
        if elapsed + predicted > args.budget_s:
            results["cases"].append({"tokens": case[0], "hidden": case[1], "vocab": case[2],
                                     "weight_requires_grad": case[3], "status": "not_run",
                                     "error": f"time budget: {elapsed:.0f}s elapsed + ~{predicted:.0f}s predicted "
                                              f"> --budget-s {args.budget_s:.0f}"})
            print(f"{label}: NOT RUN (time budget: {elapsed:.0f}s + ~{predicted:.0f}s > {args.budget_s:.0f}s)",
                  flush=True)
            continue
        t0 = time.time()
        print(f"{label} ...", flush=True)
        rec = bench_case(case, methods, args, device, dtype, timer)
        rec["wall_s"] = time.time() - t0
        walls.append((work, rec["wall_s"]))
        results["cases"].append(rec)
        summary = ", ".join(f"{k}: {m.get('status')} {m.get('fwd_bwd_ms_median', float('nan')):.1f} ms "
                            f"{(m.get('peak_extra_bytes') or 0) / GiB:.2f} GiB"
                            for k, m in rec.get("methods", {}).items())
        print(f"  {summary}  ({rec['wall_s']:.0f}s)", flush=True)
        dump()

    dump()
    print_table(results)
    print(f"\nwrote {out_path} ({time.time() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
