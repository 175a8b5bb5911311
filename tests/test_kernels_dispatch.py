"""`kernels.lora_apply` / `lora_shrink` / `lora_expand` stay the dispatching functions whatever was imported."""

import kernels
import kernels.triton_expand  # noqa: F401  importing the Triton modules must not shadow the API
import kernels.triton_shrink  # noqa: F401


def test_public_ops_are_functions_after_importing_the_triton_modules():
    for op in (kernels.lora_apply, kernels.lora_shrink, kernels.lora_expand):
        assert callable(op) and op.__module__ == "kernels"
