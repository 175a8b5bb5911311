"""`logprobs` and `echo` over HTTP: the OpenAI shapes (through the official client, streaming
included) with values equal to peft's log-softmax of the same model and adapter."""

from __future__ import annotations

import copy
import json

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings
from tests.peft_helpers import make_peft_model, save_adapter

ADMIN_TOKEN = "test-admin-token-logprobs"
PROMPT = "The three most important rules of customer support are"
QUESTION = "What is the capital of France?"
ATOL = 2e-3  # fp32 through 30 layers, as tests/test_engine_peft.py
N = 6  # tokens generated


@pytest.fixture(scope="module")
def reference(default_model_dir, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    peft_model = make_peft_model(copy.deepcopy(base), "r8-qv", seed=21)
    chat_text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                              tokenize=False)
    return {"tokenizer": tokenizer, "base": base, "acme": peft_model,
            "dir": save_adapter(peft_model, tmp_path_factory.mktemp("acme")),
            "prompt_ids": tokenizer.encode(PROMPT), "chat_ids": tokenizer.encode(chat_text, add_special_tokens=False)}


def _teacher_forced(model, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """The reference's greedy continuation and the log-softmax over prompt + continuation."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
        return ids[len(prompt_ids):], model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory, reference):
    settings = Settings.from_env(device="cpu", max_num_seqs=8, num_kv_blocks=256, max_model_len=512, max_loras=2,
                                 max_lora_rank=16, admin_token=ADMIN_TOKEN,
                                 adapter_store=str(tmp_path_factory.mktemp("adapters")), served_model_name="")
    with BackgroundServer(create_app(settings)) as running:
        directory = reference["dir"]
        files = {"adapter_config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
                 "adapter_model": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes())}
        response = httpx.put(f"{running.url}/admin/adapters/acme", files=files,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
        assert response.status_code == 201, response.text
        yield running


def _client(server, customer=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120,
                         default_headers={"X-Customer-Id": customer} if customer else None)


@pytest.mark.parametrize("customer", [None, "acme"])
def test_completion_logprobs_match_peft(server, reference, customer):
    model = reference[customer or "base"]
    tokens, expected = _teacher_forced(model, reference["prompt_ids"], N)
    P = len(reference["prompt_ids"])
    response = _client(server, customer).completions.create(
        model=customer or "SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=N, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True})
    lp = response.choices[0].logprobs
    texts = [reference["tokenizer"].decode([t]) for t in tokens]
    assert lp.tokens == texts
    assert lp.token_logprobs == pytest.approx([expected[P + i - 1, t].item() for i, t in enumerate(tokens)], abs=ATOL)
    assert lp.text_offset == [sum(len(t) for t in texts[:i]) for i in range(N)]
    for i, top in enumerate(lp.top_logprobs):
        assert len(top) <= 3  # a dict by token text: two tokens of one text would share a key
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(expected[P + i - 1].max().item(), abs=ATOL)
        assert texts[i] in top  # greedy: the token drawn is the most likely one


def test_echo_returns_the_prompt_and_its_teacher_forced_logprobs(server, reference):
    ids = reference["prompt_ids"]
    tokens, expected = _teacher_forced(reference["acme"], ids, 2)
    response = _client(server, "acme").completions.create(
        model="acme", prompt=PROMPT, max_tokens=2, temperature=0, logprobs=1, echo=True,
        extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.text == PROMPT + reference["tokenizer"].decode(tokens)
    all_ids = ids + tokens
    lp = choice.logprobs
    assert lp.tokens == [reference["tokenizer"].decode([t]) for t in all_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([expected[j - 1, all_ids[j]].item()
                                                   for j in range(1, len(all_ids))], abs=ATOL)
    # echo without logprobs: the text only; token ids as the prompt echo their decoding
    plain = _client(server).completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=1,
                                               temperature=0, echo=True)
    assert plain.choices[0].text.startswith(reference["tokenizer"].decode(ids))
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_with_echo_scores_the_prompt_alone(server, reference, stream):
    """How evaluation harnesses score a text (lm-eval's loglikelihood): echo, logprobs, max_tokens 0.
    The answer is the prompt, each of its tokens with peft's teacher-forced log-probability, no
    completion token (usage says 0), finish_reason length."""
    ids = reference["prompt_ids"]
    _, expected = _teacher_forced(reference["acme"], ids, 0)
    kwargs = dict(model="acme", prompt=PROMPT, max_tokens=0, temperature=0, logprobs=1, echo=True)
    client = _client(server, "acme")
    if stream:
        text, tokens, logprobs, finish = "", [], [], None
        for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
                if choice.logprobs is not None:
                    tokens += choice.logprobs.tokens
                    logprobs += choice.logprobs.token_logprobs
            usage = chunk.usage or None
    else:
        response = client.completions.create(**kwargs)
        choice = response.choices[0]
        text, tokens, logprobs, finish = choice.text, choice.logprobs.tokens, choice.logprobs.token_logprobs, \
            choice.finish_reason
        usage = response.usage
    assert text == PROMPT
    assert tokens == [reference["tokenizer"].decode([t]) for t in ids]
    assert logprobs[0] is None
    assert logprobs[1:] == pytest.approx([expected[j - 1, ids[j]].item() for j in range(1, len(ids))], abs=ATOL)
    assert finish == "length"
    assert usage.completion_tokens == 0 and usage.prompt_tokens == len(ids)
    # without echo: an empty completion; a negative max_tokens is still refused
    empty = client.completions.create(model="acme", prompt=PROMPT, max_tokens=0)
    assert empty.choices[0].text == "" and empty.usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="acme", prompt=PROMPT, max_tokens=-1)


def test_streamed_logprobs_equal_the_whole_response(server, reference):
    client = _client(server)
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=N, temperature=0, logprobs=2, echo=True,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    tokens, logprobs, offsets, text = [], [], [], ""
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                logprobs += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert logprobs[0] is None and logprobs[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-6)


def test_chat_logprobs_match_peft_streamed_or_not(server, reference):
    tokens, expected = _teacher_forced(reference["acme"], reference["chat_ids"], 4)
    P = len(reference["chat_ids"])
    client = _client(server, "acme")
    kwargs = dict(model="acme", messages=[{"role": "user", "content": QUESTION}], max_tokens=4, temperature=0,
                  logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kwargs) for choice in chunk.choices
                if choice.logprobs is not None for entry in choice.logprobs.content]
    for entries in (content, streamed):
        assert [e.token for e in entries] == [reference["tokenizer"].decode([t]) for t in tokens]
        for i, (e, t) in enumerate(zip(entries, tokens)):
            assert e.logprob == pytest.approx(expected[P + i - 1, t].item(), abs=ATOL)
            assert bytes(e.bytes).decode() == e.token
            assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
            assert e.top_logprobs[0].token == e.token  # greedy
    # logprobs: true alone gives the tokens' own log-probabilities and no alternatives
    bare = client.chat.completions.create(**{**kwargs, "top_logprobs": None}).choices[0].logprobs.content
    assert [e.top_logprobs for e in bare] == [[]] * 4
    # not asked: null, as OpenAI
    plain = client.chat.completions.create(**{**kwargs, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_bad_logprobs_requests_are_400(server):
    http = httpx.Client(base_url=server.url, timeout=60)
    for path, body in (("/v1/completions", {"prompt": "hi", "logprobs": 50}),
                       ("/v1/completions", {"prompt": "hi", "logprobs": "3"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 2})):
        response = http.post(path, json=body)
        assert response.status_code == 400, response.text
        assert json.loads(response.text)["error"]["type"] == "invalid_request_error"
