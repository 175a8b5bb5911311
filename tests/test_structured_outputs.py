"""Structured outputs on the default model: every constrained answer parses and validates against
its schema (nested objects, enums, arrays, any object), in the same batches as free-form requests
whose tokens stay what they are alone; sync and asynchronous scheduling; schemas the grammar
engine cannot compile are refused."""

import json

import jsonschema
import pytest

from server.config import Settings
from server.engine.engine import Engine
from server.engine.grammar import GrammarError
from server.engine.request import GenerationRequest, SamplingParams

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "colour": {"type": "string", "enum": ["red", "green", "blue"]},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                 "country": {"enum": ["FR", "DE", "NO"]}},
                "required": ["city", "country"], "additionalProperties": False}},
    "required": ["name", "age", "colour", "address"], "additionalProperties": False}
ORDERS = {"type": "object", "properties": {
    "orders": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "paid": {"type": "boolean"},
                                         "tags": {"type": "array", "maxItems": 2,
                                                  "items": {"enum": ["gift", "express"]}}},
        "required": ["id", "paid", "tags"], "additionalProperties": False}}},
    "required": ["orders"], "additionalProperties": False}
ANY_OBJECT = {"type": "object"}
SCHEMAS = [PERSON, ORDERS, ANY_OBJECT]
PROMPTS = ["Describe a customer as JSON.", "List the customer's orders as JSON."]


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "async"])
def engine(default_model_dir, request):
    return Engine.from_dir(default_model_dir, Settings(max_loras=1, max_lora_rank=8, num_kv_blocks=256,
                                                       kv_block_size=16, max_num_seqs=8, max_model_len=512,
                                                       async_scheduling=request.param))


def _constrained(schema, prompt, temperature=0.0, seed=0):
    sampling = SamplingParams(max_tokens=160, temperature=temperature, seed=seed, json_schema=json.dumps(schema))
    return GenerationRequest(prompt, sampling, chat=True)


def test_every_constrained_answer_fits_its_schema_beside_free_form_requests(engine):
    free = [GenerationRequest("Tell me a story about a fox.", SamplingParams(max_tokens=12, temperature=0), chat=True),
            GenerationRequest("The capital of France is", SamplingParams(max_tokens=10, temperature=0.9, seed=3))]
    alone = [engine.generate([r])[0].token_ids for r in free]
    # bounded schemas greedy and sampled; any object greedy, asked for something short (an unbounded
    # object may run past max_tokens, truncated, as OpenAI's would)
    constrained = [_constrained(s, p, t, seed) for s, p in zip(SCHEMAS[:2], PROMPTS) for t, seed in ((0.0, 0), (1.0, 7))]
    constrained.insert(2, _constrained(ANY_OBJECT, 'Answer with the JSON object {"city": "Paris"} and nothing else.'))
    results = engine.generate(constrained[:3] + free[:1] + constrained[3:] + free[1:])
    answers = results[:3] + results[4:-1]
    for request, result in zip(constrained, answers):
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), json.loads(request.sampling.json_schema))
    assert [results[3].token_ids, results[-1].token_ids] == alone  # unconstrained rows untouched


def test_free_json_is_what_the_model_writes_without_the_grammar_when_it_fits(engine):
    """The mask forbids only what the grammar forbids: where the unconstrained greedy answer is
    itself a JSON object, the constrained one is the same text."""
    prompt = 'Repeat exactly: {"a": 1}'
    (free,) = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=12, temperature=0), chat=True)])
    (constrained,) = engine.generate([_constrained(ANY_OBJECT, prompt)])
    json.loads(constrained.text)
    if free.text.strip().startswith("{") and _parses(free.text):
        assert constrained.text == free.text


def _parses(text):
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("schema", ['{"type": "foo"}', '{"type": "object", "properties": 3}',
                                    '{"$ref": "#/definitions/missing"}', "not json",
                                    '{"type": "string", "pattern": "(("}'])
def test_a_schema_the_grammar_engine_cannot_compile_is_refused(engine, schema):
    request = GenerationRequest("hi", SamplingParams(max_tokens=4, json_schema=schema))
    with pytest.raises(GrammarError, match="cannot be used for structured output"):
        engine.make_sequence(request)
    assert not engine.scheduler.has_work()  # nothing was queued


def test_masks_equal_xgrammars_own_application(engine):
    """Our unpacking of the bitmasks (torch ops, CPU and GPU alike) against xgrammar's apply."""
    import torch
    import xgrammar as xgr

    from server.engine.grammar import mask_logits

    matchers = [engine.grammars.matcher(json.dumps(s)) for s in (PERSON, ORDERS)]
    for token in engine.tokenizer.encode('{"orders', add_special_tokens=False):
        assert matchers[1].accept(token)  # a state inside a key, where few tokens fit
    vocab = engine.model.config.vocab_size
    ours, theirs = torch.randn(4, vocab), None
    theirs = ours.clone()
    bitmask = xgr.allocate_token_bitmask(4, vocab)
    for row, matcher in zip((1, 3), matchers):
        matcher.fill(bitmask, row)
    xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=[1, 3])
    mask_logits(ours, [1, 3], matchers)
    assert torch.equal(ours, theirs)
    assert torch.isfinite(ours[[0, 2]]).all() and 0 < torch.isfinite(ours[3]).sum() < 100
