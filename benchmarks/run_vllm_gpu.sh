#!/usr/bin/env bash
# The vLLM-on-GPU runs of issue 14, in stages that each fit one device call (see benchmarks/README.md).
# Run after vLLM 0.26 is unpacked into /root/vsite and `source benchmarks/device_setup.sh`:
#   bash benchmarks/run_vllm_gpu.sh tests   # cumem probe + tests/vllm_env on CUDA       -> $OUT
#   bash benchmarks/run_vllm_gpu.sh kv      # the KV-only release test alone (CUDA sleep/wake cycles)
#   bash benchmarks/run_vllm_gpu.sh bench   # native / VllmEngine / plain vLLM; gc patch -> $OUT
#   bash benchmarks/run_vllm_gpu.sh grpo    # GRPO steps, engine vllm vs native
#   TUNE_S=540 bash benchmarks/run_vllm_gpu.sh tune   # compilepass tune --engine vllm (short; TUNE_MODEL, TUNE_TRIALS)
#   bash benchmarks/run_vllm_gpu.sh trl     # benchmarks/bench_vs_trl.py (TRL, TRL+vLLM, TRL+ours, ours)
#   bash benchmarks/run_vllm_gpu.sh warm    # one plain vLLM start with a long timeout: FlashInfer's JIT
#                                           # builds (its sampler: minutes on a fresh machine) -> $OUT tarball
#   bash benchmarks/run_vllm_gpu.sh context # bench context under an 80 GiB cap, engine native then vllm
#                                           # (CONTEXT_MODEL, CONTEXT_LEN, CONTEXT_ARGS, CONTEXT_S per engine,
#                                           # CONTEXT_ENGINES="native" without vLLM)
#   bash benchmarks/run_vllm_gpu.sh learn   # benchmarks/learn_vs_trl.py on SmolLM2-135M-Instruct (ours, TRL+vLLM);
#                                           # its GGUF arrives in two calls: cp .smol/pN/* /root/smolparts/
#   bash benchmarks/run_vllm_gpu.sh start   # benchmarks/bench_warm_start.py (issue 15: engine start cold, warm
#                                           # through the FX cache, warm with the persisted layer; no vLLM needed)
# Every stage first restores .ficache/flashinfer.tar.gz (that tarball, carried) into ~/.cache.
set -uo pipefail
[ $# -gt 0 ] || { echo "usage: run_vllm_gpu.sh STAGE [STAGE ...] (kv tests bench grpo tune trl context learn start warm)"; exit 2; }
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=/root/vsite:${PYTHONPATH:-} VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONUNBUFFERED=1
# vLLM 0.26's FlashInfer top-k / top-p sampler JIT-builds on a machine's first start (nvcc, minutes: session 7's
# plain-vLLM rows timed out in it). 0 selects vLLM's own PyTorch / Triton sampler (vllm/envs.py); the results
# record it (bench_vllm.py's vllm_env). VLLM_USE_FLASHINFER_SAMPLER=1 with the `warm` stage measures FlashInfer's.
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
tag=h200_$(date -u +%Y-%m-%d)
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
if [ -f .ficache/flashinfer.tar.gz ] && [ ! -d ~/.cache/flashinfer ]; then
  mkdir -p ~/.cache && tar -xzf .ficache/flashinfer.tar.gz -C ~/.cache && echo "FlashInfer JIT cache restored"
fi
# Several stages in one call run one after another (fewer calls: a reply that comes more than 30 s
# after the previous call ends loses the machine, and vLLM with it)
for stage in "$@"; do
echo "== stage $stage"
case "$stage" in
tests)
  # TESTS_PART=main (the shared-engine tests) or sleep (the sleep-mode ones) splits the stage over two calls
  part=${TESTS_PART:-all}
  # where the 375 objects the gc-heap test finds frozen on the H200 come from (sessions 13 and 15): at
  # interpreter start, after torch's CUDA init, after importing vLLM
  python3 -c "import gc; a = gc.get_freeze_count(); import torch; torch.zeros(1, device='cuda'); b = gc.get_freeze_count(); import vllm; print('gc freeze count: start', a, 'after CUDA init', b, 'after import vllm', gc.get_freeze_count())" 2>&1 | tail -1
  [ "${PROBE_S:-120}" -gt 0 ] && timeout "${PROBE_S:-120}" python3 benchmarks/probe_vllm_cumem.py \
    --out "$out/vllm_cumem_probe_$tag.json" 2>&1 | tail -40
  # one sleep-mode vLLM engine per process (vLLM's CuMem pool): the shared-engine tests in one pytest, then
  # each test that builds a sleep-mode engine in a pytest of its own
  sleepers="cuda_sleep one_grpo_step bench_context_trial"
  [ "$part" != sleep ] && COMPILEPASS_VLLM_TESTS=1 timeout "${TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider \
    --timeout 240 -rA tests/vllm_env tests/test_vllm_kv_release.py -k "not (${sleepers// / or })" 2>&1 \
    | tee "$out/pytest_vllm_$tag.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|Error" | tail -40
  [ "$part" = main ] && sleepers=""
  for t in $sleepers; do
    COMPILEPASS_VLLM_TESTS=1 timeout "${SLEEP_TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider --timeout 190 -rA \
      tests/vllm_env -k "$t" 2>&1 | tee -a "$out/pytest_vllm_$tag.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed" | tail -5
  done
  ;;
kv)
  COMPILEPASS_VLLM_TESTS=1 timeout "${TESTS_S:-230}" python3 -m pytest -q -p no:cacheprovider --timeout "${TEST_TIMEOUT_S:-210}" -rA \
    tests/vllm_env -k "cuda_sleep or gates" 2>&1 > "$out/pytest_vllm_kv_$tag.log"; echo "pytest exit $?"
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|Error|assert|Timeout|File \"/work" "$out/pytest_vllm_kv_$tag.log" | tail -40
  ;;
bench)
  timeout 560 python3 benchmarks/bench_vllm.py --out "$out/vllm_side_by_side_$tag.json" --child-timeout-s 200 \
    ${BENCH_ARGS:-} 2>&1 | tail -30
  ;;
grpo)
  common=(--preset tiny --no-progress model.name_or_path=qwen3-0.6b model.dtype=bfloat16 model.lora_rank=32
          model.lora_alpha=64 model.init_std=null data.prompts_per_step=8 generation.num_generations=8
          generation.max_prompt_len=64 generation.max_completion_len=256 run.max_steps=${GRPO_STEPS:-5}
          run.save_every=0 run.device=cuda)
  for eng in native vllm; do
    /usr/bin/time -v timeout 200 python3 -m compilepass.cli grpo "${common[@]}" generation.engine=$eng \
      run.output_dir=/tmp/grpo-$eng > "$out/grpo_${eng}_$tag.log" 2>&1
    echo "grpo $eng exit $?"; tail -4 "$out/grpo_${eng}_$tag.log"
    cp /tmp/grpo-$eng/metrics.jsonl "$out/grpo_${eng}_metrics_$tag.jsonl" 2>/dev/null
  done
  ;;
start)
  timeout "${START_S:-560}" python3 benchmarks/bench_warm_start.py --warm "${START_WARM:-3}" \
    --out "$out/warm_start_qwen3-0.6b_$tag.json" 2>&1 | tail -12
  ;;
tune)
  tune_s=${TUNE_S:-540}
  tune_model=${TUNE_MODEL:-qwen3-0.6b}
  timeout "$tune_s" python3 -m compilepass.cli tune --engine vllm --model "$tune_model" --trials "${TUNE_TRIALS:-4}" \
    --repeats 3 --verify-rounds 4 --verify-candidates 1 --time-budget $((tune_s - 150)) --no-record \
    --out "$out/tune_vllm_${tune_model}_$tag.json" > "$out/tune_vllm_${tune_model}_$tag.log" 2>&1
  echo "tune exit $?"; tail -15 "$out/tune_vllm_${tune_model}_$tag.log"
  ;;
trl)
  timeout "${TRL_S:-560}" python3 benchmarks/bench_vs_trl.py --out "$out/vs_trl_$tag.json" --model qwen3-0.6b \
    --device-memory-gib 80 ${TRL_ARGS:-} > "$out/vs_trl_$tag.log" 2>&1
  echo "bench_vs_trl exit $?"; grep -vE "it/s\]|s/it\]" "$out/vs_trl_$tag.log" | tail -25
  ;;
context)
  model=${CONTEXT_MODEL:-qwen3-8b}; len=${CONTEXT_LEN:-131072}
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  for eng in ${CONTEXT_ENGINES:-native vllm}; do
    timeout "${CONTEXT_S:-280}" python3 -m compilepass.cli bench context --engine $eng --model "$model" \
      --device-memory-gib 80 --standby on --generate-tokens 16 --compile eager --min-len "$len" --max-len "$len" \
      ${CONTEXT_ARGS:---micro-batch-size 1} --out "$out/context_${model}_${eng}_cap80_$tag.json" \
      > "$out/context_${model}_${eng}_cap80_$tag.log" 2>&1
    echo "context $eng exit $?"; grep -E "completion_len|max_completion_len" "$out/context_${model}_${eng}_cap80_$tag.log" | tail -3
  done
  ;;
learn)
  if [ ! -d /root/smol ]; then
    cat /root/smolparts/smolpart_* > /root/smol.gguf && echo "$(cat .smol/sha256)  /root/smol.gguf" | sha256sum -c - \
      && python3 -m compilepass.cli model import-gguf /root/smol.gguf /root/smol > /dev/null || exit 1
  fi
  timeout "${LEARN_S:-560}" python3 benchmarks/learn_vs_trl.py --model-dir /root/smol --device-memory-gib 80 \
    --out "$out/learn_vs_trl_smollm2_$tag.json" ${LEARN_ARGS:-} > "$out/learn_vs_trl_$tag.log" 2>&1
  echo "learn_vs_trl exit $?"; tail -4 "$out/learn_vs_trl_$tag.log"
  ;;
warm)
  timeout "${WARM_S:-420}" python3 benchmarks/bench_vllm.py --out "$out/vllm_warm_start_$tag.json" --only plain-vllm \
    --repeats 1 --child-timeout-s $((${WARM_S:-420} - 20)) 2>&1 | tail -5
  tar -czf "$out/flashinfer.tar.gz" -C ~/.cache flashinfer && ls -la "$out/flashinfer.tar.gz"
  ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
done
