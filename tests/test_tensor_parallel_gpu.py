"""Tensor parallelism on CUDA (run on the device; skipped elsewhere).

- On any GPU count: the CPU suite's TP=2 = TP=1 check (tests/test_tensor_parallel.py) with the
  model, KV cache, adapter pool and collectives on CUDA: under NCCL with rank r on cuda:r when
  there are two GPUs, else both ranks on one GPU through gloo (which takes CUDA tensors), so the
  device side of the driver (pending tokens broadcast from the device, shards scattered into
  pools on CUDA, DoRA norms all-reduced on the pool's copy stream) runs even on one GPU.
- With two GPUs or more: the engine itself, `Engine.from_dir(..., tensor_parallel_size=2)`,
  against the single-GPU engine: CUDA graphs holding the NCCL all-reduces, asynchronous
  scheduling, adapters swapped in by the driver; the same greedy tokens (fp32).
"""

import json

import pytest
import torch
import torch.multiprocessing as mp

from server.model.tensor_parallel import free_tcp_address
from tests.tensor_parallel_cases import run_case, worker
from tests.test_tensor_parallel import MODELS, RTOL_OF_SCALE, write_cases

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device)")]

GPU_MODELS = {name: MODELS[name] for name in ("llama-kv1", "llama-bias")}
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-gpu")
    spec = write_cases(root, GPU_MODELS)
    backend = "nccl" if TWO_GPUS else "gloo"
    (root / "spec.json").write_text(json.dumps({"cases": spec, "driven": sorted(spec), "out_dir": str(root),
                                                "backend": backend, "device": "cuda:0"}))
    mp.spawn(worker, args=(2, free_tcp_address(), str(root / "spec.json")), nprocs=2, join=True)
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(2)]
    return {name: (run_case(case, None, "cuda:0"), ranks[0][name], ranks[1][name], ranks[0][f"driven:{name}"])
            for name, case in spec.items()}


@pytest.mark.parametrize("case", [f"{m}/{kind}" for m in sorted(GPU_MODELS) for kind in ("base", "mixed")])
def test_tp2_logits_equal_tp1_on_cuda(results, case):
    reference, rank0, rank1, driven = results[case]
    scale = max(step.abs().max().item() for step in reference)
    for step, (expected, got0, got1, got_driven) in enumerate(zip(reference, rank0, rank1, driven)):
        torch.testing.assert_close(got0, expected, atol=RTOL_OF_SCALE * scale, rtol=0, msg=f"step {step}")
        torch.testing.assert_close(got_driven, expected, atol=RTOL_OF_SCALE * scale, rtol=0, msg=f"driven step {step}")
        assert torch.equal(got0, got1), f"step {step}: the ranks disagree"


def _tokenizer(path, vocab_size: int) -> None:
    """A word-level tokenizer over the tiny vocabulary ("t0" .. ), saved beside the checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="t2").save_pretrained(path)


@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs (a multi-GPU machine kind)")
def test_engine_on_two_gpus_generates_the_single_gpu_tokens(tmp_path):
    from server.config import Settings
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, SamplingParams

    spec = write_cases(tmp_path, {"llama-kv4": MODELS["llama-kv4"]})
    case = spec["llama-kv4/mixed"]
    _tokenizer(case["model_dir"], 128)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [[(7 * i + j) % 120 + 3 for j in range(5 + 3 * i)] for i in range(8)]

    def generate(tp: int) -> list[list[int]]:
        settings = Settings(device="cuda", dtype="float32", max_loras=4, max_lora_rank=16, max_num_seqs=8,
                            max_model_len=128, tensor_parallel_size=tp)
        engine = Engine.from_dir(case["model_dir"], settings)
        try:
            for i, adapter_dir in enumerate(case["adapter_dirs"]):
                engine.add_adapter(f"a{i}", adapter_dir)
            requests = [GenerationRequest(p, params, adapter=None if i % 4 == 3 else f"a{i % 4}")
                        for i, p in enumerate(prompts)]
            return [r.token_ids for r in engine.generate(requests)]
        finally:
            engine.close()

    single, split = generate(1), generate(2)
    assert len({tuple(t) for t in single}) > 1
    assert split == single


def test_an_nccl_all_reduce_replays_inside_a_cuda_graph():
    """What the ranks' step graphs rely on (every GPU count: a group of one still runs NCCL's
    kernels): torch.distributed's NCCL all-reduce captured in a CUDA graph sums on each replay."""
    import torch.distributed as dist

    from server.model.tensor_parallel import init_tensor_parallel

    tp = init_tensor_parallel(0, 1, free_tcp_address(), backend="nccl", device_index=0)
    try:
        x = torch.ones(64, 4096, device="cuda", dtype=torch.bfloat16)
        tp.all_reduce(x)  # the communicator is made outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = tp.all_reduce(x * 3)
        x.fill_(2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, torch.full_like(y, 6))
    finally:
        dist.destroy_process_group()


def test_the_benchmarks_symmetric_memory_all_reduces_run_in_a_group_of_one():
    """The benchmark's measurement of symmetric-memory all-reduces beside NCCL's
    (loadtest/bench_tensor_parallel.py): its setup, check and graph capture run here (a group of
    one: no peer is read); on several GPUs the same code compares them."""
    import torch.distributed as dist

    from loadtest.bench_tensor_parallel import SYMMETRIC_METHODS, symmetric_all_reduce_time
    from server.model.tensor_parallel import init_tensor_parallel

    tp = init_tensor_parallel(0, 1, free_tcp_address(), backend="nccl", device_index=0)
    try:
        assert SYMMETRIC_METHODS == ("symm_mem_one_shot", "symm_mem_two_shot")
        seconds = symmetric_all_reduce_time(tp, 64, 4096, "cuda:0", "symm_mem_one_shot")
        assert isinstance(seconds, float) and 0 < seconds < 1e-3, seconds
        # two shot splits the buffer between ranks: PyTorch refuses a group of one, and the
        # benchmark reports why instead of a time
        assert "world_size=1" in symmetric_all_reduce_time(tp, 64, 4096, "cuda:0", "symm_mem_two_shot")
    finally:
        dist.destroy_process_group()
