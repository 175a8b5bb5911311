"""The engine on the default SmolLM2 against peft: logits, greedy tokens, mixed batches."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from tests.peft_helpers import make_peft_model, save_adapter

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
NUM_TOKENS = 32
LOGIT_ATOL = 2e-3  # fp32 through 30 layers: summation order differs from transformers'
ENGINE_CONFIGS = ["r8-qv", "r16-all-linear-rslora", "patterns", "layers-to-transform", "dora-r8-qv"]


@pytest.fixture(scope="module")
def hf_base(default_model_dir):
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(default_model_dir):
    settings = Settings(max_loras=4, max_lora_rank=16, num_kv_blocks=512, max_num_seqs=16, max_model_len=1024)
    return Engine.from_dir(default_model_dir, settings)


@pytest.fixture(scope="module")
def peft_models(hf_base, engine, tmp_path_factory):
    models = {}
    for seed, name in enumerate(ENGINE_CONFIGS):
        peft_model = make_peft_model(copy.deepcopy(hf_base), name, seed=seed, b_std=0.02)
        engine.add_adapter(name, save_adapter(peft_model, tmp_path_factory.mktemp(name)))
        models[name] = peft_model
    return models


def _greedy(n=NUM_TOKENS):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _hf_greedy(model, prompt_ids, n=NUM_TOKENS):
    """peft's own greedy decode, EOS not treated specially (as ignore_eos=True does)."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            do_sample=False, max_new_tokens=n, eos_token_id=-1, pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("name", ENGINE_CONFIGS)
def test_logits_and_greedy_tokens_match_peft(engine, peft_models, hf_base, name):
    model = peft_models[name]
    for prompt in PROMPTS:
        request = GenerationRequest(prompt, _greedy(), adapter=name, chat=True)
        ids = engine.encode(request)
        expected = _hf_greedy(model, ids)
        (result,) = engine.generate([request])
        assert result.token_ids == expected, prompt
    # prefill logits over a whole prompt, against peft's
    ids = engine.encode(GenerationRequest(PROMPTS[0], adapter=name, chat=True))
    from server.model.runner import SequenceChunk

    blocks = engine.blocks.allocate(engine.blocks.blocks_needed(len(ids)))
    try:
        slot = engine.adapters.pin(name)
        ours = engine.runner.run([SequenceChunk(ids, 0, blocks, slot)], all_logits=True)
        engine.adapters.unpin(name)
    finally:
        engine.blocks.free(blocks)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
        base = hf_base(torch.tensor([ids])).logits[0]
    diff = (ours - theirs).abs().max().item()
    print(f"\nmax |logit diff| vs peft [{name}]: {diff:.3g}")
    assert diff < LOGIT_ATOL
    assert (theirs - base).abs().max().item() > 100 * LOGIT_ATOL  # the adapter matters


def test_mixed_batch_equals_each_request_alone(engine, peft_models):
    requests = [
        GenerationRequest(PROMPTS[0], _greedy(20), adapter="r8-qv", chat=True),
        GenerationRequest(PROMPTS[1], _greedy(12), adapter="r16-all-linear-rslora", chat=True),
        GenerationRequest(PROMPTS[2], _greedy(25), adapter=None, chat=True),
        GenerationRequest("Once upon a time", _greedy(16), adapter="patterns"),
        GenerationRequest(PROMPTS[1], _greedy(12), adapter=None, chat=True),
        GenerationRequest(PROMPTS[1], _greedy(12), adapter="dora-r8-qv", chat=True),
    ]
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert together[1].token_ids != together[4].token_ids  # same prompt, adapter vs base


def test_base_model_answers_the_capital_question(engine):
    (result,) = engine.generate([GenerationRequest("What is the capital of France?", SamplingParams(max_tokens=20, temperature=0), chat=True)])
    assert result.text == "The capital of France is Paris."
    assert result.finish_reason == "stop"
