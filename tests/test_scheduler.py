"""The scheduler driven by a fake runner: no model, no torch in the loop."""

import zlib

from server.engine.block_manager import BlockAllocator
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Sequence


class FakeAdapters:
    """Adapter residency with a fixed number of device slots and controllable load states."""

    def __init__(self, num_slots: int, states: dict | None = None):
        self.num_slots = num_slots
        self.states = states or {}
        self.pins: dict = {}

    def prepare(self, key):
        return self.states.get(key, "ready")

    def error(self, key):
        return f"{key} is broken"

    def can_pin(self, key):
        return key in self.pins or len(self.pins) < self.num_slots

    def pin(self, key):
        self.pins[key] = self.pins.get(key, 0) + 1
        return sorted(self.pins).index(key)

    def unpin(self, key):
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]


def make_seq(prompt_len: int, max_tokens: int = 4, tenant: str | None = None, seed: int = 0) -> Sequence:
    prompt = [(seed * 31 + i) % 1000 for i in range(prompt_len)]
    request = GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), adapter=tenant)
    return Sequence(request=request, prompt_ids=prompt, adapter_key=tenant)


def fake_step(sched: Scheduler, log: list | None = None):
    """One step with a deterministic 'model': the next token is a hash of everything before it."""
    out = sched.schedule()
    if log is not None:
        log.append(out)
    for c in out.chunks:
        done = c.completes_prompt
        c.seq.num_cached_tokens += c.num_tokens
        if done:
            c.seq.output_ids.append(zlib.crc32(bytes(str(c.seq.all_ids), "ascii")) % 1000)
            if len(c.seq.output_ids) >= c.seq.sampling.max_tokens:
                sched.finish(c.seq)
                c.seq.finish_reason = "length"
    return out


def drain(sched: Scheduler, max_steps: int = 1000, log=None) -> int:
    steps = 0
    while sched.has_work():
        fake_step(sched, log)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, slots=4, states=None):
    adapters = FakeAdapters(slots, states)
    sched = Scheduler(SchedulerConfig(max_num_seqs, budget), BlockAllocator(num_blocks, block_size), adapters)
    return sched, adapters


def test_running_cap_and_token_budget_hold_every_step():
    sched, _ = make_scheduler(max_num_seqs=3, budget=20)
    for i in range(7):
        sched.add(make_seq(9, max_tokens=5, seed=i))
    log = []
    drain(sched, log=log)
    assert all(len(out.chunks) <= 3 and out.num_batched_tokens <= 20 for out in log)
    assert sched.blocks.num_free == sched.blocks.num_blocks


def test_long_prompt_is_chunked_and_shares_steps_with_decodes():
    sched, _ = make_scheduler(budget=16)
    short = make_seq(3, max_tokens=10)
    sched.add(short)
    fake_step(sched)  # short prefills and starts decoding
    long = make_seq(40, max_tokens=2, seed=1)
    sched.add(long)
    log = []
    while long.num_cached_tokens < 40:
        log.append(fake_step(sched))
    fed = [[c.num_tokens for c in out.chunks if c.seq is long] for out in log]
    assert fed == [[15], [15], [10]]  # the decode takes one token of each step's 16
    assert all(any(c.seq is short and c.num_tokens == 1 for c in out.chunks) for out in log)
    assert len(long.output_ids) == 1  # sampled only once the whole prompt was in


def test_preemption_and_resume_give_identical_output():
    def run(num_blocks):
        sched, _ = make_scheduler(num_blocks=num_blocks, block_size=4, budget=64)
        seqs = [make_seq(6, max_tokens=20, seed=i) for i in range(6)]
        for s in seqs:
            sched.add(s)
        drain(sched)
        return [s.output_ids for s in seqs], sched.num_preemptions

    roomy, preempted_roomy = run(200)
    tight, preempted_tight = run(16)  # 6 sequences of 26 tokens need 42 blocks
    assert preempted_roomy == 0 and preempted_tight > 0
    assert tight == roomy


def test_no_more_distinct_adapters_than_slots_run_at_once():
    sched, adapters = make_scheduler(slots=2)
    for i in range(9):
        sched.add(make_seq(5, max_tokens=3, tenant=f"t{i % 3}", seed=i))
    while sched.has_work():
        fake_step(sched)
        assert len({s.adapter_key for s in sched.running}) <= 2
        assert len(adapters.pins) <= 2
    assert not adapters.pins


def test_a_loading_adapter_does_not_stall_other_tenants():
    sched, adapters = make_scheduler(states={"slow": "loading"})
    slow = make_seq(5, tenant="slow")
    others = [make_seq(5, tenant="fast", seed=1), make_seq(5, seed=2)]
    sched.add(slow)
    for s in others:
        sched.add(s)
    for _ in range(10):
        fake_step(sched)
    assert all(s.finish_reason == "length" for s in others)
    assert slow.output_ids == [] and slow in sched.waiting["slow"]
    adapters.states["slow"] = "ready"
    drain(sched)
    assert slow.finish_reason == "length"


def test_a_failed_adapter_fails_only_its_requests():
    sched, _ = make_scheduler(states={"broken": "failed"})
    bad, good = make_seq(5, tenant="broken"), make_seq(5, tenant="ok")
    sched.add(bad)
    sched.add(good)
    out = sched.schedule()
    assert out.failed == [bad] and bad.error == "broken is broken"
    assert [c.seq for c in out.chunks] == [good]


def test_a_flooding_tenant_cannot_starve_the_others():
    sched, _ = make_scheduler(max_num_seqs=2)
    flood = [make_seq(5, max_tokens=2, tenant="flood", seed=i) for i in range(40)]
    for s in flood:
        sched.add(s)
    fake_step(sched)
    late = [make_seq(5, max_tokens=2, tenant="quiet", seed=100 + i) for i in range(2)]
    for s in late:
        sched.add(s)
    admitted = []
    while sched.has_work():
        out = fake_step(sched)
        admitted += [c.seq for c in out.chunks if c.seq.num_cached_tokens == c.num_tokens]
    positions = [admitted.index(s) for s in late]
    assert max(positions) <= 4  # round-robin: quiet's two requests alternate with flood's


def test_abort_releases_blocks_and_adapter_pin_at_once():
    sched, adapters = make_scheduler()
    running, waiting = make_seq(10, max_tokens=50, tenant="a"), make_seq(10, tenant="b")
    sched.add(running)
    fake_step(sched)
    sched.add(waiting)
    assert sched.abort(running) and sched.abort(waiting)
    assert sched.blocks.num_free == sched.blocks.num_blocks and not adapters.pins
    assert not sched.has_work()
    assert not sched.abort(running)  # already gone


def test_a_pin_that_fails_fails_that_request_and_leaks_nothing():
    sched, adapters = make_scheduler()

    def broken_pin(key):
        raise RuntimeError(f"{key}: file changed on disk")

    adapters.pin = broken_pin
    seq = make_seq(5, tenant="a")
    sched.add(seq)
    out = sched.schedule()
    assert out.failed == [seq] and "changed on disk" in seq.error
    assert sched.blocks.num_free == sched.blocks.num_blocks and not sched.has_work()
