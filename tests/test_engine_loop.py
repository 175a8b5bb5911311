"""The engine thread with asyncio consumers: streaming, concurrency, cancellation."""

import asyncio
import time

import pytest

from server.config import Settings
from server.engine.engine import Engine
from server.engine.loop import EngineLoop, _stable_prefix
from server.engine.request import GenerationRequest, SamplingParams
from tests.test_engine import random_adapter


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "async"])
def engine(default_model_dir, request):
    e = Engine.from_dir(default_model_dir, Settings(max_loras=2, max_lora_rank=8, num_kv_blocks=64, kv_block_size=8,
                                                    max_num_seqs=8, max_model_len=512, async_scheduling=request.param))
    for i in range(3):
        e.add_adapter(f"t{i}", random_adapter(e.model.config, rank=4, seed=10 + i))
    return e


@pytest.fixture
def loop(engine):
    lp = EngineLoop(engine)
    lp.start()
    yield lp
    lp.stop()
    assert not lp._thread.is_alive()


async def _collect(lp, request):
    events = [e async for e in lp.stream(request)]
    return events


def test_concurrent_streams_equal_generate_alone(engine, loop):
    requests = [
        GenerationRequest(f"Tell me fact number {i} about the moon.", SamplingParams(max_tokens=12 + i, temperature=0),
                          adapter=[None, "t0", "t1", "t2"][i % 4], chat=True)
        for i in range(6)
    ]

    async def main():
        return await asyncio.gather(*(_collect(loop, r) for r in requests))

    streamed = asyncio.run(main())
    loop.stop()
    alone = [engine.generate([r])[0] for r in requests]
    for events, expected in zip(streamed, alone):
        assert events[-1].finish_reason == expected.finish_reason
        assert "".join(e.text for e in events) == expected.text
        assert sum((e.token_ids for e in events), []) == expected.token_ids
        assert all(e.finish_reason is None for e in events[:-1])
        assert events[-1].completion_tokens == len(expected.token_ids)


def test_leaving_a_stream_aborts_it_and_frees_its_blocks(engine, loop):
    async def main():
        stream = loop.stream(GenerationRequest("Count slowly:", SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), adapter="t1"))
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_work()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_invalid_request_raises_to_the_caller_and_the_loop_keeps_serving(engine, loop):
    async def main():
        with pytest.raises(ValueError, match="context"):
            await _collect(loop, GenerationRequest(list(range(1, 600)), SamplingParams(max_tokens=2)))
        return await _collect(loop, GenerationRequest("Hi", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))

    events = asyncio.run(main())
    assert events[-1].finish_reason == "length"


def test_stable_prefix_holds_back_partial_stops_and_characters():
    assert _stable_prefix("hello wor", ("world",)) == "hello "
    assert _stable_prefix("hello", ("xyz",)) == "hello"
    assert _stable_prefix("caf\ufffd", ()) == "caf"


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_a_step_that_raises_fails_only_its_sequences_and_the_next_step_runs(default_model_dir, async_scheduling):
    """One running sequence at a time (max_num_seqs=1): A runs, B waits; a fault injected into
    A's step ends A with an explicit error, B then runs to its end as it would alone, every KV
    block and adapter slot comes back, and the loop keeps serving."""
    engine = Engine.from_dir(default_model_dir, Settings(max_loras=2, max_lora_rank=8, num_kv_blocks=64, kv_block_size=8,
                                                         max_num_seqs=1, max_model_len=512,
                                                         async_scheduling=async_scheduling))
    engine.add_adapter("t0", random_adapter(engine.model.config, rank=4, seed=10))
    fault = {"armed": False, "raised": 0}
    launch = engine.launch

    def faulty_launch(chunks):
        if fault["armed"]:
            fault["armed"] = False
            fault["raised"] += 1
            raise RuntimeError("injected fault")
        return launch(chunks)

    engine.launch = faulty_launch
    loop = EngineLoop(engine)
    loop.start()
    b_request = GenerationRequest("Name three rivers.", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                                  adapter="t0")

    async def main():
        a_events, b_task = [], None
        async for event in loop.stream(GenerationRequest("Count slowly:", SamplingParams(max_tokens=200, temperature=0,
                                                                                         ignore_eos=True))):
            a_events.append(event)
            if b_task is None:
                b_task = asyncio.ensure_future(_collect(loop, b_request))  # queued behind A
                await asyncio.sleep(0.05)
                fault["armed"] = True
        return a_events, await b_task

    try:
        a_events, b_events = asyncio.run(main())
        assert fault["raised"] == 1
        assert a_events[-1].finish_reason == "error" and "RuntimeError" in a_events[-1].error
        assert a_events[-1].completion_tokens < 200
        assert b_events[-1].finish_reason == "length"
        after = asyncio.run(_collect(loop, GenerationRequest("Hi", SamplingParams(max_tokens=3, temperature=0,
                                                                                  ignore_eos=True))))
        assert after[-1].finish_reason == "length" and loop.is_alive
    finally:
        loop.stop()
    assert sum((e.token_ids for e in b_events), []) == engine.generate([b_request])[0].token_ids  # as alone
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_work()
