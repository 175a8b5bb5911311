"""Our forward over quantized base weights (--quantize nf4 / fp8, quantized at load) against
independent references, on the CPU (fp32).

NF4: a tiny random Qwen2 (biased q/k/v) with peft LoRA and DoRA adapters, against peft over the same
base whose every linear is bitsandbytes' own NF4 round trip (quantize_4bit + dequantize_4bit,
blocksize 64, double quantization): what a QLoRA-trained adapter saw. Tolerance NF4_ATOL: the
nested absmax codes of bitsandbytes' CPU build differ from ours on near-ties
(tests/test_nf4_quantize.py), which moves a few weights by a part in 10^4; against peft over our
own dequantized weights the forward matches at the dense tolerance (ATOL). Then SmolLM2 (the
default model) quantized at load generates the same greedy tokens as transformers over the
bitsandbytes-dequantized checkpoint.
A checkpoint transformers saved with a bitsandbytes NF4 config loads as saved (no re-quantization):
our logits equal the float32 model of bitsandbytes' decoded weights, with and without a peft adapter,
at ATOL (bitsandbytes' own CPU forward computes in bf16 on AVX512-BF16 CPUs: checked loosely).
FP8: the tiny model's logits against a float32 re-computation of the fp8 forward (kernels/fp8.py)
from transformers' modules, and close to the dense model (the quantization error, bounded).
"""

from __future__ import annotations

import os
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from kernels.fp8 import dequantize_fp8, quantize_activations, quantize_fp8
from kernels.nf4 import dequantize_nf4, quantize_nf4
from server.lora.peft import load_peft_adapter_dir
from server.lora.pool import AdapterPool
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.model.quantized import QuantizationError, weight_bytes, weight_format
from server.model.runner import ModelRunner, SequenceChunk
from tests.peft_helpers import make_peft_model, save_adapter

if not torch.cuda.is_available():
    # bitsandbytes imports triton: Triton's own library functions are defined then, interpreted or
    # not, so the CPU interpreter must be chosen before (as the kernel test modules do)
    os.environ.setdefault("TRITON_INTERPRET", "1")
bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the reference (dev extra)")

ATOL = 5e-5
NF4_ATOL = 2e-3
CONFIGS = ["r8-qv", "r16-all-linear-rslora", "dora-r4-all-linear-patterns"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEARS]


def bnb_round_trip(model):
    """Every projection linear's weight replaced by bitsandbytes' NF4 quantize + dequantize, in place."""
    with torch.no_grad():
        for _, module in _linears(model):
            packed, state = bnb_functional.quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True,
                                                         quant_type="nf4")
            module.weight.copy_(bnb_functional.dequantize_4bit(packed, state))
    return model


def our_round_trip(model, quantize):
    with torch.no_grad():
        for _, module in _linears(model):
            module.weight.copy_(quantize(module.weight.data))
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(3)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    hf = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("base")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """name -> (peft over bitsandbytes' NF4 base, peft over our NF4 base, parsed adapter)"""
    hf, path = base
    cfg = load_model(path, torch.float32, "cpu").config
    bnb_base = bnb_round_trip(copy.deepcopy(hf))
    ours_base = our_round_trip(copy.deepcopy(hf), lambda w: dequantize_nf4(quantize_nf4(w)))
    out = {}
    for seed, name in enumerate(CONFIGS):
        over_bnb = make_peft_model(copy.deepcopy(bnb_base), name, seed=200 + seed)
        over_ours = make_peft_model(copy.deepcopy(ours_base), name, seed=200 + seed)  # the same adapter values
        adapter_dir = save_adapter(over_bnb, tmp_path_factory.mktemp(name))
        out[name] = (over_bnb, over_ours, load_peft_adapter_dir(adapter_dir, cfg, max_rank=16))
    return out, bnb_base


def _runner(model, adapters=()):
    c = model.config
    kv = KVCache(c.num_layers, 64, 4, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    slots = {}
    if adapters:
        pool = AdapterPool(model, max_adapters=len(adapters) + 1, max_rank=16)
        for slot, (name, adapter) in enumerate(adapters, start=1):
            pool.load(slot, adapter)
            slots[name] = slot
    return ModelRunner(model, kv, "cpu"), slots


def _logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_nf4_logits_match_peft_over_the_bitsandbytes_base(base, adapters, name):
    _, path = base
    table, bnb_base = adapters
    model = load_model(path, torch.float32, "cpu", quantize="nf4")
    runner, slots = _runner(model, [(n, a[2]) for n, a in sorted(table.items())])
    ids = torch.randint(0, 128, (11,)).tolist()
    ours = runner.run([SequenceChunk(ids, 0, [3, 9, 1], lora_slot=slots[name])], all_logits=True)
    over_bnb, over_ours, _ = table[name]
    torch.testing.assert_close(ours, _logits(over_bnb, ids), atol=NF4_ATOL, rtol=0)
    torch.testing.assert_close(ours, _logits(over_ours, ids), atol=ATOL, rtol=0)
    # the adapter matters, and so does quantization: this test could fail both ways
    assert (_logits(over_bnb, ids) - _logits(bnb_base, ids)).abs().max() > 50 * NF4_ATOL
    assert (_logits(base[0], ids) - _logits(bnb_base, ids)).abs().max() > 10 * ATOL


def test_nf4_mixed_batch_of_adapters_and_base(base, adapters):
    _, path = base
    table, bnb_base = adapters
    runner, slots = _runner(load_model(path, torch.float32, "cpu", quantize="nf4"),
                            [(n, a[2]) for n, a in sorted(table.items())])
    names = CONFIGS + [None]
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 1, 9, 7)]
    chunks = [SequenceChunk(p, 0, [10 * i + j for j in range(4)], lora_slot=-1 if n is None else slots[n])
              for i, (p, n) in enumerate(zip(prompts, names))]
    logits = runner.run(chunks)
    for row, (p, n) in enumerate(zip(prompts, names)):
        reference = bnb_base if n is None else table[n][0]
        torch.testing.assert_close(logits[row], _logits(reference, p)[-1], atol=NF4_ATOL, rtol=0)


def test_nf4_weights_take_a_quarter_and_a_bit(base):
    _, path = base
    dense, nf4 = load_model(path, torch.float32, "cpu"), load_model(path, torch.float32, "cpu", quantize="nf4")
    assert weight_format(nf4) == "nf4" and weight_format(dense) == "fp32"
    assert weight_bytes(nf4)["other"] == weight_bytes(dense)["other"]
    elements = weight_bytes(dense)["projections"] // 4
    # 4 bits a weight, one absmax code a 64-block, 4 bytes a 256-block group, small tables per module
    assert elements / 2 < weight_bytes(nf4)["projections"] < elements * (0.5 + 1 / 64 + 1 / 4000) + 4 * 4096


def test_fp8_logits_are_the_fp8_forward(base):
    """Our fp8 model against transformers' modules with each linear replaced by the fp8 forward
    computed here from the published definition, and within the quantization error of the dense model."""
    hf, path = base
    model = load_model(path, torch.float32, "cpu", quantize="fp8")
    assert weight_format(model) == "fp8"
    reference = copy.deepcopy(hf)
    for _, module in _linears(reference):
        w = quantize_fp8(module.weight.data)

        def forward(x, w=w, bias=module.bias):
            xq, sx = quantize_activations(x.reshape(-1, x.shape[-1]))
            y = (xq.float() @ dequantize_fp8(w, torch.float32).T) * sx
            y = y if bias is None else y + bias
            return y.reshape(*x.shape[:-1], -1)

        module.forward = forward
    runner, _ = _runner(model)
    ids = torch.randint(0, 128, (9,)).tolist()
    ours = runner.run([SequenceChunk(ids, 0, [0, 1, 2])], all_logits=True)
    torch.testing.assert_close(ours, _logits(reference, ids), atol=1e-4, rtol=1e-4)
    dense = _logits(hf, ids)
    assert 0 < (ours - dense).abs().max() < 0.05 * dense.abs().max()


def test_a_quantized_checkpoint_and_an_unknown_format_are_clear_errors(base, tmp_path):
    _, path = base
    with pytest.raises(QuantizationError, match="unknown quantization 'int3'"):
        load_model(path, torch.float32, "cpu", quantize="int3")
    quantized = tmp_path / "awq"
    quantized.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match="quant_method 'awq'.*--quantize nf4"):
        load_model(quantized, torch.float32, "cpu")


def test_smollm2_nf4_greedy_tokens_match_transformers_over_the_bitsandbytes_base(default_model_dir):
    """The default model quantized at load (fp32 on the CPU) against transformers over bitsandbytes'
    NF4 round trip of the same checkpoint: identical greedy tokens."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    hf = bnb_round_trip(AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval())
    model = load_model(default_model_dir, torch.float32, "cpu", quantize="nf4")
    runner, _ = _runner(model)
    for prompt in ("What is the capital of France?", "Write a haiku about the sea."):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            expected = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        tokens, table = list(ids), list(range(32))  # 32 blocks of 4 tokens: the prompt and 16 more
        logits = runner.run([SequenceChunk(tokens, 0, table)])
        generated = []
        for _ in range(16):
            token = int(logits[0].argmax())
            generated.append(token)
            logits = runner.run([SequenceChunk([token], len(tokens), table)])
            tokens.append(token)
        assert generated == expected, (tokenizer.decode(generated), tokenizer.decode(expected))


def test_metrics_state_the_weight_format_and_bytes():
    from prometheus_client import generate_latest

    from server.config import Settings
    from server.metrics import EngineSnapshot, Metrics

    metrics = Metrics(Settings())
    memory = {"weight_format": "nf4", "weight_bytes": 37_000_000_000, "projection_weight_bytes": 36_000_000_000,
              "kv_cache_bytes": 60_000_000_000, "adapter_pool_bytes": 28_000_000_000}
    metrics.bind_engine(lambda: EngineSnapshot(0, 0, 0.0, 0, 0, 8, [], [], memory=memory))
    text = generate_latest(metrics.registry).decode()
    assert 'loraplex_model_weight_bytes{format="nf4"} 3.7e+10' in text
    assert "loraplex_kv_cache_bytes 6e+10" in text and "loraplex_adapter_pool_bytes 2.8e+10" in text


@pytest.fixture(scope="module")
def bnb_checkpoint(base, tmp_path_factory):
    """The tiny base saved by transformers with a bitsandbytes 4-bit NF4 config (double quantization),
    and transformers' own model loaded from it (bitsandbytes' CPU backend)."""
    from transformers import BitsAndBytesConfig

    _, path = base
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()
    out = tmp_path_factory.mktemp("bnb-nf4")
    quantized.save_pretrained(out)
    return out, quantized


def bnb_decoded(hf_base, quantized):
    """A dense copy of `hf_base` whose projection weights are bitsandbytes' own decoding
    (dequantize_4bit) of the Linear4bit modules in `quantized`: the float32 model those modules stand
    for. bitsandbytes' CPU Linear4bit forward computes in bf16 on CPUs with AVX512-BF16 (0.50), so
    the exact reference is its decoded weights in a float32 forward."""
    decoded = copy.deepcopy(hf_base)
    modules = dict(_linears(quantized))
    with torch.no_grad():
        for name, linear in _linears(decoded):
            module = modules[name]
            linear.weight.copy_(bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state))
    return decoded.eval()


def test_a_bitsandbytes_nf4_checkpoint_loads_as_saved(base, bnb_checkpoint):
    """Its codes and statistics are read as they are (no re-quantization): our logits equal the
    float32 model of bitsandbytes' decoded weights, a LoRA adapter on top equals peft's over it, and
    transformers' own Linear4bit model agrees within its bf16 compute."""
    hf_base, _ = base
    path, quantized = bnb_checkpoint
    model = load_model(path, torch.float32, "cpu")
    assert weight_format(model) == "nf4"
    ids = torch.randint(0, 128, (10,)).tolist()
    runner, _ = _runner(model)
    # decoded before any forward: bitsandbytes' CPU forward repacks a Linear4bit's weight in place
    decoded = bnb_decoded(hf_base, quantized)
    with torch.no_grad():
        module = quantized.model.layers[1].mlp.down_proj
        expected = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    # the modules bitsandbytes saved dequantize to exactly the weights we hold
    torch.testing.assert_close(model.layers[1].mlp.down_proj.dense_weight(0), expected, atol=0, rtol=0)
    ours = runner.run([SequenceChunk(ids, 0, [0, 1, 2])], all_logits=True)
    torch.testing.assert_close(ours, _logits(decoded, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours, _logits(quantized, ids), atol=2e-2, rtol=0)
    peft_model = make_peft_model(decoded, "r8-qv", seed=11)
    adapter_dir = save_adapter(peft_model, path.parent / "adapter-over-bnb")
    runner, slots = _runner(load_model(path, torch.float32, "cpu"),
                            [("a", load_peft_adapter_dir(adapter_dir, model.config, max_rank=16))])
    ours = runner.run([SequenceChunk(ids, 0, [0, 1, 2], lora_slot=slots["a"])], all_logits=True)
    torch.testing.assert_close(ours, _logits(peft_model, ids), atol=ATOL, rtol=0)


def test_bitsandbytes_checkpoints_we_cannot_read_are_clear_errors(bnb_checkpoint, tmp_path):
    path, _ = bnb_checkpoint
    with pytest.raises(QuantizationError, match="cannot re-quantize"):
        load_model(path, torch.float32, "cpu", quantize="fp8")
    for change, message in (({"bnb_4bit_quant_type": "fp4"}, "only nf4"), ({"load_in_4bit": False}, "8-bit")):
        other = tmp_path / message.replace(" ", "-")
        other.mkdir()
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"].update(change)
        (other / "config.json").write_text(json.dumps(config))
        with pytest.raises(QuantizationError, match=message):
            load_model(other, torch.float32, "cpu")


def _write_fp8_checkpoint(base_path, out, per_tensor: bool, method="compressed-tensors"):
    """The tiny base as llm-compressor writes an FP8 checkpoint: e4m3 weights with weight_scale per
    channel (N, 1) or per tensor, a static input_scale, and its quantization_config."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(base_path / "model.safetensors"))
    for key in [k for k in tensors if k.endswith("_proj.weight")]:
        w = tensors[key].float()
        if per_tensor:
            scale = (w.abs().max() / 448.0).reshape(1)
            q = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            fp8 = quantize_fp8(w)
            q, scale = fp8.weight, fp8.scale.reshape(-1, 1)
        tensors[key] = q
        tensors[key.removesuffix("weight") + "weight_scale"] = scale.to(torch.bfloat16 if per_tensor else torch.float32)
        tensors[key.removesuffix("weight") + "input_scale"] = torch.tensor([0.05])
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((base_path / "config.json").read_text())
    strategy = "tensor" if per_tensor else "channel"
    config["quantization_config"] = {
        "quant_method": method, "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}}}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_an_fp8_compressed_tensors_checkpoint_loads_as_saved(base, tmp_path):
    hf, path = base
    channel = load_model(_write_fp8_checkpoint(path, tmp_path / "channel", per_tensor=False), torch.float32, "cpu")
    at_load = load_model(path, torch.float32, "cpu", quantize="fp8")
    assert weight_format(channel) == "fp8"
    ids = torch.randint(0, 128, (9,)).tolist()
    logits = [_runner(m)[0].run([SequenceChunk(ids, 0, [0, 1, 2])], all_logits=True) for m in (channel, at_load)]
    assert torch.equal(logits[0], logits[1])  # the same e4m3 values and scales as quantized at load
    tensor = load_model(_write_fp8_checkpoint(path, tmp_path / "tensor", per_tensor=True), torch.float32, "cpu")
    w = hf.model.layers[0].self_attn.k_proj.weight.detach().float()
    scale = torch.tensor(float((w.abs().max() / 448.0).to(torch.bfloat16)))
    expected = ((w / (w.abs().max() / 448.0)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale)
    torch.testing.assert_close(tensor.layers[0].self_attn.qkv_proj.dense_weight(1), expected, atol=0, rtol=0)


def test_fp8_checkpoints_we_cannot_read_are_clear_errors(base, tmp_path):
    _, path = base
    good = _write_fp8_checkpoint(path, tmp_path / "good", per_tensor=False)
    for change, message in (({"format": "pack-quantized"}, "only float-quantized"),
                            ({"config_groups": {"g": {"weights": {"num_bits": 8, "type": "float",
                                                                  "strategy": "block"}}}}, "'block' weight scales"),
                            ({"config_groups": {"g": {"weights": {"num_bits": 4, "type": "int",
                                                                  "strategy": "group"}}}}, "only 8-bit float")):
        other = tmp_path / message.replace(" ", "-").replace("'", "")
        other.mkdir()
        config = json.loads((good / "config.json").read_text())
        config["quantization_config"].update(change)
        (other / "config.json").write_text(json.dumps(config))
        with pytest.raises(QuantizationError, match=message):
            load_model(other, torch.float32, "cpu")
    with pytest.raises(QuantizationError, match="cannot re-quantize"):
        load_model(good, torch.float32, "cpu", quantize="nf4")


def test_the_quantize_flag_and_variable():
    from server.cli import build_parser, serve_settings
    from server.config import Settings

    args = build_parser().parse_args(["serve", "--quantize", "nf4"])
    assert serve_settings(args).quantize == "nf4"
    assert Settings.from_env({"LORAPLEX_QUANTIZE": "fp8"}).quantize == "fp8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantize", "int4"])
    with pytest.raises(ValueError, match="quantize must be nf4, fp8 or none"):
        Settings.from_env({"LORAPLEX_QUANTIZE": "awq"})
