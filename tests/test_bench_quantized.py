"""Smoke test of loadtest/bench_quantized.py on the CPU: a tiny random model quantized in place,
a few tenants, short runs; the JSON has every row, figure and target the H200 run reports."""

import json

from loadtest import bench_quantized


def test_bench_runs_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_quantized, "BATCHES", (1, 4))
    monkeypatch.setattr(bench_quantized, "TENANTS", 6)
    monkeypatch.setattr(bench_quantized, "PROMPT", 8)
    monkeypatch.setattr(bench_quantized, "DECODE_STEPS", 4)
    monkeypatch.setitem(bench_quantized.ITL_TARGET_S, "tiny", 0.1)
    bench_quantized.main(["--shape", "tiny", "--formats", "bf16,nf4,fp8", "--device", "cpu", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "quantized_bench_tiny_h200.json").read_text())
    assert [run["format"] for run in result["runs"]] == ["bf16", "nf4", "fp8"]
    for run in result["runs"]:
        assert [(r["batch"], r["tenants"]) for r in run["rows"]] == [(1, 0), (1, 6), (4, 0), (4, 6)]
        for row in run["rows"]:
            assert row["step_p50_s"] > 0 and row["roofline_step_s"] > 0 and row["over_roofline"] > 0
    weights = {run["format"]: run["memory"]["weight_bytes"]["projections"] for run in result["runs"]}
    assert weights["nf4"] < weights["fp8"] < weights["bf16"]  # fp32 on the CPU: nf4 ~1/7.5, fp8 ~1/4
    assert result["targets"]["nf4_over_bf16_step_batch1"] > 0


def test_the_70b_shape_is_the_issues():
    cfg = bench_quantized.SHAPES["llama2-70b"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == \
        (80, 8192, 8, 28672)
