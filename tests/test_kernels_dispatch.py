"""`kernels.lora_shrink` / `lora_expand` stay the dispatching functions whatever was imported."""

import kernels
import kernels.triton_expand  # noqa: F401  importing the Triton modules must not shadow the API
import kernels.triton_shrink  # noqa: F401


def test_public_ops_are_functions_after_importing_the_triton_modules():
    assert callable(kernels.lora_shrink) and callable(kernels.lora_expand)
    assert kernels.lora_shrink.__module__ == "kernels" and kernels.lora_expand.__module__ == "kernels"
