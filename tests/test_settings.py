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


def test_lora_modules_name_groups_or_modules_and_refuse_others():
    assert Settings.from_env({}).restricted_lora_modules() is None  # all: nothing to restrict
    attention = Settings.from_env({"LORAPLEX_LORA_MODULES": "attention"}).restricted_lora_modules()
    assert attention == {"q_proj", "k_proj", "v_proj", "o_proj"}
    mixed = Settings.from_env({"LORAPLEX_LORA_MODULES": "q_proj, v_proj,mlp"}).restricted_lora_modules()
    assert mixed == {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert Settings.from_env({"LORAPLEX_LORA_MODULES": "attention,mlp"}).restricted_lora_modules() is None
    with pytest.raises(ValueError, match="lora_modules: 'lm_head'"):
        Settings.from_env({"LORAPLEX_LORA_MODULES": "attention,lm_head"})
