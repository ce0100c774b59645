#!/usr/bin/env bash
# The vLLM-on-GPU runs of issue 14, in stages that each fit one device call (see benchmarks/README.md).
# Run after vLLM 0.26 is unpacked into /root/vsite and `source benchmarks/device_setup.sh`:
#   bash benchmarks/run_vllm_gpu.sh tests   # cumem probe + tests/vllm_env on CUDA       -> $OUT
#   bash benchmarks/run_vllm_gpu.sh kv      # the KV-only release test alone (CUDA sleep/wake cycles)
#   bash benchmarks/run_vllm_gpu.sh bench   # native / VllmEngine / plain vLLM; gc patch -> $OUT
#   bash benchmarks/run_vllm_gpu.sh grpo    # GRPO steps, engine vllm vs native; a short vLLM tune
set -uo pipefail
stage=${1:?stage: tests, bench or grpo}
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=/root/vsite:${PYTHONPATH:-} VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONUNBUFFERED=1
tag=h200_$(date -u +%Y-%m-%d)
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
case "$stage" in
tests)
  timeout 120 python3 benchmarks/probe_vllm_cumem.py --out "$out/vllm_cumem_probe_$tag.json" 2>&1 | tail -40
  COMPILEPASS_VLLM_TESTS=1 timeout "${TESTS_S:-420}" python3 -m pytest -q -p no:cacheprovider --timeout 240 -rA \
    tests/vllm_env tests/test_vllm_kv_release.py 2>&1 | tee "$out/pytest_vllm_$tag.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|Error" | tail -60
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
  if [ "${TUNE_S:-0}" != 0 ]; then
    timeout "$TUNE_S" python3 -m compilepass.cli tune --engine vllm --model qwen3-0.6b --trials "${TUNE_TRIALS:-4}" \
      --repeats 3 --verify-rounds 4 --verify-candidates 1 --time-budget $((TUNE_S - 150)) --no-record \
      --out "$out/tune_vllm_qwen3-0.6b_$tag.json" > "$out/tune_vllm_$tag.log" 2>&1
    echo "tune exit $?"; tail -15 "$out/tune_vllm_$tag.log"
  fi
  ;;
esac
