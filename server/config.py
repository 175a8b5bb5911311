"""One settings object, built once from CLI flags and `LORAPLEX_*` environment variables.

Nothing else in loraplex reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path


def _default_home() -> Path:
    return Path(os.path.expanduser("~/.cache/loraplex"))


@dataclass(frozen=True)
class Settings:
    home: Path = _default_home()  # LORAPLEX_HOME: prepared models and the adapter store live here
    model: str | None = None  # LORAPLEX_MODEL: checkpoint dir or .gguf; None = embedded SmolLM2
    device: str = "auto"  # LORAPLEX_DEVICE: auto | cpu | cuda[:N]
    dtype: str = "auto"  # LORAPLEX_DTYPE: auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    max_lora_rank: int = 64  # LORAPLEX_MAX_LORA_RANK
    max_loras: int = 8  # LORAPLEX_MAX_LORAS: adapter slots on the device
    kv_block_size: int = 16  # LORAPLEX_KV_BLOCK_SIZE: tokens per KV cache block
    num_kv_blocks: int = 0  # LORAPLEX_NUM_KV_BLOCKS: 0 = derive from max_num_seqs x context
    max_num_seqs: int = 32  # LORAPLEX_MAX_NUM_SEQS
    max_num_batched_tokens: int = 2048  # LORAPLEX_MAX_NUM_BATCHED_TOKENS: tokens per step (prefill chunks + decodes)
    max_model_len: int = 0  # LORAPLEX_MAX_MODEL_LEN: 0 = min(model limit, 4096)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        """Defaults, then LORAPLEX_* variables, then explicit overrides (CLI flags; None = unset)."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(f"LORAPLEX_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "home" in values:
            values["home"] = Path(values["home"]).expanduser()
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be >= 1")
        if self.max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.kv_block_size < 1:
            raise ValueError("kv_block_size must be >= 1")
        if self.dtype not in {"auto", "float32", "bfloat16", "float16"}:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def _coerce(name: str, raw: str, type_name) -> object:
    type_name = str(type_name)
    try:
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"LORAPLEX_{name.upper()}={raw!r} is not a valid {type_name}") from exc
    return raw
