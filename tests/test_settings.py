"""Settings from LORAPLEX_* variables: values are parsed, bad ones refused with the setting's name."""

import pytest
import torch

from server.config import Settings
from server.model.runner import select_blas_library


def test_blas_library_comes_from_the_environment_and_is_checked():
    assert Settings.from_env({}).blas_library == "auto"
    assert Settings.from_env({"LORAPLEX_BLAS_LIBRARY": "cublas"}).blas_library == "cublas"
    with pytest.raises(ValueError, match="blas_library"):
        Settings.from_env({"LORAPLEX_BLAS_LIBRARY": "openblas"})


def test_async_scheduling_is_checked():
    assert Settings.from_env({"LORAPLEX_ASYNC_SCHEDULING": "off"}).async_scheduling == "off"
    with pytest.raises(ValueError, match="async_scheduling"):
        Settings.from_env({"LORAPLEX_ASYNC_SCHEDULING": "sometimes"})


def test_the_blas_choice_leaves_a_cpu_process_alone():
    before = torch.backends.cuda.preferred_blas_library()
    select_blas_library("cublaslt", torch.device("cpu"))
    assert torch.backends.cuda.preferred_blas_library() == before


def test_lora_overlap_comes_from_the_environment_and_leaves_the_cpu_on_one_stream():
    from loadtest.random_model import StubTokenizer, random_model
    from server.engine.engine import Engine

    assert Settings.from_env({}).lora_overlap == "auto"
    assert Settings.from_env({"LORAPLEX_LORA_OVERLAP": "off"}).lora_overlap == "off"
    with pytest.raises(ValueError, match="lora_overlap"):
        Settings.from_env({"LORAPLEX_LORA_OVERLAP": "sometimes"})
    tiny = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5,
                max_position_embeddings=64, rope_theta=10000.0)
    engine = Engine(random_model(tiny, torch.float32, "cpu"), StubTokenizer(),
                    Settings(device="cpu", lora_overlap="on", max_loras=2, max_lora_rank=8, num_kv_blocks=8))
    assert engine.runner.lora_side_stream is None and engine.runner.lora_meta.side_stream is None
