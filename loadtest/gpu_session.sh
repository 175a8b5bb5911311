#!/usr/bin/env bash
# What one GPU session runs on the device machine, from the repository root:
#
#   bash loadtest/gpu_session.sh tests     # the GPU tests (-m gpu), log in $OUT/gpu_tests.log
#   bash loadtest/gpu_session.sh micro     # attention and engine benchmarks (JSON in $OUT)
#   bash loadtest/gpu_session.sh dora      # 64 DoRA vs 64 LoRA adapters, one run (engine_dora_bench_h200.json)
#   bash loadtest/gpu_session.sh serving [bench_serving.py args]   # the HTTP serving benchmark
#   bash loadtest/gpu_session.sh peft      # loraplex vs HF transformers/peft (vs_peft_h200.json), issue 11
#   bash loadtest/gpu_session.sh scale     # 1..2000 adapters, S-LoRA workload (adapter_scale_h200.json), issue 11
#   bash loadtest/gpu_session.sh upload    # 100 customers uploaded under traffic (upload_under_load_h200.json)
#   bash loadtest/gpu_session.sh quantized 7b    # NF4/FP8 bases (issue 15): the 7B in bf16, nf4 and fp8 (~5 min)
#   bash loadtest/gpu_session.sh quantized 70b   # the 70B shape in nf4 (< 10 min), quantized_bench_llama2-70b_h200.json
#   bash loadtest/gpu_session.sh quantized kernels   # each projection's x W^T alone, and the fused kernel's tuning
#   bash loadtest/gpu_session.sh prefix [bench_prefix_structured.py args]   # prefix caching on/off, structured outputs
#   bash loadtest/gpu_session.sh tp 7b [--tp 1,2,4]   # issue 17: TP GPU tests, then the 7B on 1/2/4 GPUs
#   bash loadtest/gpu_session.sh tp 70b [--tp 2,4]    # the 70B bf16 on 2 and 4 GPUs (multi-GPU kinds)
#     one GPU: tp 7b --tp 1 --one-rank-of 2,4; tp 70b --tp "" --one-rank-of 2,4 (a rank of 2 or 4 alone, no all-reduce)
#
# peft and scale leave their checkpoint in /tmp/bench; upload serves it when it is there.
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
mode=${1:?tests, micro, dora, serving, peft, scale, upload, quantized, prefix or tp}
shift

case "$mode" in
  tests)
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
    # the KV write and fused elementwise tests are not marked gpu: the CPU interpreter in CI, CUDA here
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kv_write.py tests/test_fused_elementwise.py \
      tests/test_dora_kernel.py tests/test_nf4_kernels.py 2>&1 | tee "$OUT/gpu_tests.log"
    timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
      tests/test_paged_attention_gpu.py tests/test_fused_elementwise_gpu.py tests/test_engine_gpu.py tests/test_lora_forward_gpu.py \
      tests/test_lora_kernels_gpu.py tests/test_dora_gpu.py tests/test_quantized_gpu.py tests/test_prefix_logprobs_structured_gpu.py -k "not sweep" "$@" 2>&1 \
      | tee -a "$OUT/gpu_tests.log"
    ;;
  tp)
    # tensor parallelism: the GPU tests (NCCL with two GPUs; on one, both ranks share it through gloo),
    # then the benchmark; every size in --tp must have its GPUs
    part=${1:?7b or 70b}
    shift
    nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
    if [ "$part" = 7b ]; then
      timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_tensor_parallel_gpu.py 2>&1 | tee "$OUT/tp_gpu_tests.log"
      timeout 480 python3 loadtest/bench_tensor_parallel.py --shape llama2-7b --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_tp_7b.log"
    fi
    if [ "$part" = 70b ]; then
      timeout 580 python3 loadtest/bench_tensor_parallel.py --shape llama2-70b --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_tp_70b.log"
    fi
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
  quantized)
    # one part per command of the device tool: each stays under its 10 minutes
    part=${1:?7b, 70b or kernels}
    if [ "$part" = 7b ]; then
      timeout 400 python3 loadtest/bench_quantized.py --shape llama2-7b --formats bf16,nf4,fp8 --out "$OUT" 2>&1 \
        | tee "$OUT/bench_quantized_7b.log"
    fi
    if [ "$part" = 70b ]; then
      timeout 560 python3 loadtest/bench_quantized.py --shape llama2-70b --formats nf4 --out "$OUT" 2>&1 \
        | tee "$OUT/bench_quantized_70b.log"
    fi
    if [ "$part" = kernels ]; then
      timeout 560 python3 loadtest/bench_quantized.py --kernels --tune --out "$OUT" 2>&1 | tee "$OUT/bench_quantized_kernels.log"
    fi
    ;;
  serving)
    timeout 590 python3 loadtest/bench_serving.py --out "$OUT" --tokenizer .bench/tokenizer "$@" 2>&1 \
      | tee "$OUT/bench_serving.log"
    ;;
  peft)
    timeout 560 python3 loadtest/bench_vs_peft.py --out "$OUT" --workdir /tmp/bench "$@" 2>&1 | tee "$OUT/bench_vs_peft.log"
    ;;
  scale)
    timeout 420 python3 loadtest/bench_adapter_scale.py --out "$OUT" --workdir /tmp/bench --time-budget 400 "$@" 2>&1 \
      | tee "$OUT/bench_adapter_scale.log"
    ;;
  upload)
    ckpt=(); [ -d /tmp/bench/model-llama2-7b ] && ckpt=(--checkpoint /tmp/bench/model-llama2-7b)
    timeout 200 python3 loadtest/bench_upload_under_load.py --out "$OUT" "${ckpt[@]}" "$@" 2>&1 \
      | tee "$OUT/bench_upload_under_load.log"
    ;;
  *)
    echo "unknown mode $mode: tests, micro, dora, serving, peft, scale, upload, quantized or prefix" >&2
    exit 2
    ;;
esac
