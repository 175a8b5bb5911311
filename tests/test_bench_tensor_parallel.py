"""Smoke test of loadtest/bench_tensor_parallel.py on the CPU: a tiny random model at TP=1 and in
a TP=2 gloo group, a few tenants, short runs; the JSON has every row, figure and target the
multi-GPU run reports."""

import json

import pytest

from loadtest import bench_tensor_parallel

@pytest.mark.slow  # two spawned groups and a rank alone: about 40 s on two cores
def test_bench_runs_and_reports(tmp_path):
    bench_tensor_parallel.main(["--shape", "tiny", "--tp", "1,2", "--device", "cpu", "--batches", "1,4",
                                "--tenants", "4", "--prompt", "8", "--decode-steps", "4", "--one-rank-of", "2",
                                "--out", str(tmp_path)])
    result = json.loads((tmp_path / "tensor_parallel_tiny_h200.json").read_text())
    assert [run["tp"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert [(r["batch"], r["tenants"]) for r in run["rows"]] == [(1, 0), (1, 1), (4, 0), (4, 4)]
        for row in run["rows"]:
            assert row["step_p50_s"] > 0 and row["itl_p50_s"] > 0 and row["roofline_step_s"] > 0
            assert row["tokens_per_s"] == pytest.approx(row["batch"] / row["itl_p50_s"])
    one, two = result["runs"]
    assert two["rank_bytes"]["weights"] < one["rank_bytes"]["weights"]  # each rank reads its shard
    assert two["rank_bytes"]["adapter"] < one["rank_bytes"]["adapter"]
    assert two["rank_bytes"]["kv_per_token"] * 2 == one["rank_bytes"]["kv_per_token"]  # 2 KV heads over 2 ranks
    assert two["step_all_reduces_alone_s"] > 0
    assert all(0 < v["share"] < 1 for v in two["all_reduce_share_profiled"].values())
    assert set(result["targets"]["tp2"]) >= {"step_over_one_gpu_base", "scaling_efficiency", "lora_ratio_vs_one_gpu"}
    # one rank of 2 alone, in this process: the very bytes a rank of the real group reads, no all-reduce
    (alone,) = result["one_rank_runs"]
    assert (alone["tp"], alone["one_rank_of"]) == (1, 2)
    assert alone["rank_bytes"] == two["rank_bytes"]
    assert alone["step_all_reduces_alone_s"] == 0
    assert all(v["all_reduce_s_per_step"] == 0 for v in alone["all_reduce_share_profiled"].values())
    assert [(r["batch"], r["tenants"]) for r in alone["rows"]] == [(1, 0), (1, 1), (4, 0), (4, 4)]
    figures = result["targets"]["one_rank_of_2"]
    assert figures["all_reduces_per_step"] == 2 * bench_tensor_parallel.TINY["num_hidden_layers"]
    assert figures["communication_s_per_step"] == pytest.approx(
        result["targets"]["tp2"]["itl_p50_base_s"] - figures["itl_p50_base_s"])


def test_one_rank_shape_is_the_shard_plans():
    from server.model.config import ModelConfig
    from server.model.tensor_parallel import ShardPlan

    for name, world in (("llama2-70b", 2), ("llama2-70b", 4), ("llama2-7b", 4)):
        shape = bench_tensor_parallel.SHAPES[name]
        alone = ModelConfig.from_hf_dict(bench_tensor_parallel.one_rank_shape(shape, world))
        assert alone == ShardPlan(ModelConfig.from_hf_dict(shape), 0, world).local_config
    # 70B on 2: 32 query heads, 4 KV heads, each 128 wide, half the MLP
    alone = ModelConfig.from_hf_dict(bench_tensor_parallel.one_rank_shape(bench_tensor_parallel.LLAMA2_70B, 2))
    assert (alone.num_heads, alone.num_kv_heads, alone.head_dim, alone.intermediate_size) == (32, 4, 128, 14336)


def test_the_shapes_are_the_issues():
    cfg = bench_tensor_parallel.SHAPES["llama2-70b"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (80, 8192, 8)
    assert bench_tensor_parallel.SHAPES["llama2-7b"]["hidden_size"] == 4096
