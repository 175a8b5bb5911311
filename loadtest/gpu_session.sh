#!/usr/bin/env bash
# What one GPU session runs on the device machine, from the repository root:
#
#   bash loadtest/gpu_session.sh tests     # the GPU tests (-m gpu), log in $OUT/gpu_tests.log
#   bash loadtest/gpu_session.sh micro     # attention and engine benchmarks (JSON in $OUT)
#   bash loadtest/gpu_session.sh dora      # 64 DoRA vs 64 LoRA adapters, one run (engine_dora_bench_h200.json)
#   bash loadtest/gpu_session.sh serving [bench_serving.py args]   # the HTTP serving benchmark
#   bash loadtest/gpu_session.sh prefix [bench_prefix_structured.py args]   # prefix caching on/off, structured outputs
#
# The machine lacks fastapi, uvicorn, pydantic, cachetools, python-multipart, httptools, xgrammar and
# apache-tvm-ffi: they travel as wheels in .whl/ (`../shared/gpu-wheels.sh httptools xgrammar
# apache-tvm-ffi` downloads them; uvloop is there already) and are installed into /tmp/site. The
# serving benchmark needs SmolLM2's tokenizer files in .bench/tokenizer (tokenizer.json and
# tokenizer_config.json from the prepared model; the default model itself does not travel).
set -uo pipefail
OUT=${OUT:-loadtest/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=.:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
mode=${1:?tests, micro, dora, serving or prefix}
shift

case "$mode" in
  tests)
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
    # the KV write and fused elementwise tests are not marked gpu: the CPU interpreter in CI, CUDA here
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kv_write.py tests/test_fused_elementwise.py \
      tests/test_dora_kernel.py 2>&1 | tee "$OUT/gpu_tests.log"
    timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
      tests/test_paged_attention_gpu.py tests/test_fused_elementwise_gpu.py tests/test_engine_gpu.py tests/test_lora_forward_gpu.py \
      tests/test_lora_kernels_gpu.py tests/test_dora_gpu.py tests/test_prefix_logprobs_structured_gpu.py \
      -k "not sweep" "$@" 2>&1 | tee -a "$OUT/gpu_tests.log"
    ;;
  prefix)
    timeout 590 python3 loadtest/bench_prefix_structured.py --out "$OUT" --tokenizer .bench/tokenizer "$@" 2>&1 \
      | tee "$OUT/bench_prefix_structured.log"
    ;;
  dora)
    timeout 400 python3 loadtest/bench_engine_lora.py --dora --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_engine_dora.log"
    ;;
  micro)
    timeout 150 python3 loadtest/bench_attention.py --out "$OUT" 2>&1 | tee "$OUT/bench_attention.log"
    timeout 300 python3 loadtest/bench_engine_lora.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_engine.log"
    ;;
  serving)
    timeout 590 python3 loadtest/bench_serving.py --out "$OUT" --tokenizer .bench/tokenizer "$@" 2>&1 \
      | tee "$OUT/bench_serving.log"
    ;;
  *)
    echo "unknown mode $mode: tests, micro or serving" >&2
    exit 2
    ;;
esac
