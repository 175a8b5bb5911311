"""What the HTTP side costs per streamed token, with a stand-in engine (no model, no GPU).

    PYTHONPATH=. python3 loadtest/bench_http_side.py [--streams 64] [--step-ms 7] [--tokens 128]

The real app (FastAPI router, SSE formatting, metrics) and the real `EngineLoop` (engine thread,
batched hand-off, coalescing) serve closed-loop streaming clients, but the engine is a stand-in
whose step gives every running sequence one token after `--step-ms` of GIL-free waiting, as a
GPU step does. The server runs in this process (uvicorn on a thread, as in production it shares
the process with the engine thread); the clients run in worker processes. Reports:

- the engine thread's step period against `--step-ms` (the stretch the event loop's GIL
  holding adds to every step: the server-vs-engine gap of issue 10, isolated),
- the server process's CPU time per streamed token (event loop + engine thread bookkeeping),
- output tokens/s against streams / step time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from loadtest.sse_client import LoadSpec, run_clients

HOST = "127.0.0.1"


class StandInEngine:
    """The parts of server.engine.engine.Engine that EngineLoop drives, around a fixed-time step."""

    def __init__(self, step_s: float, max_num_seqs: int):
        from server.engine.sequence import SequenceStatus

        self.step_s, self.max_num_seqs, self.status = step_s, max_num_seqs, SequenceStatus
        self.running: list = []
        self.waiting: list = []
        self.step_periods: list[float] = []
        self._last_step_end: float | None = None
        self.last_step_idle = False  # every step here runs the batch
        self.device = SimpleNamespace(type="cuda")  # the engine loop tunes GIL turns as for a GPU

    def make_sequence(self, request, adapter_key=None):
        from server.engine.sequence import Sequence

        return Sequence(request=request, prompt_ids=list(request.prompt), adapter_key=adapter_key)

    def submit(self, seq) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def abort(self, seq) -> None:
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
        seq.status, seq.finish_reason = self.status.FINISHED, "abort"

    def fail_running(self, message: str) -> list:
        failed, self.running = self.running, []
        for seq in failed:
            seq.status, seq.finish_reason, seq.error = self.status.FINISHED, "error", message
        return failed

    def step(self) -> list:
        start = time.monotonic()
        if self._last_step_end is not None:
            self.step_periods.append(start - self._last_step_period_start)
        self._last_step_period_start = start
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        time.sleep(self.step_s)  # the GPU step: the GIL is free meanwhile
        for seq in self.running:
            seq.output_ids.append(1000 + len(seq.output_ids))
            seq.text += " tok"
            if len(seq.output_ids) >= seq.sampling.max_tokens:
                seq.status, seq.finish_reason = self.status.FINISHED, "length"
        updated = list(self.running)
        self.running = [s for s in self.running if not s.is_finished]
        self._last_step_end = time.monotonic()
        return updated


class StandInService:
    """What the completions router asks of server.service.Service, for the stand-in engine."""

    def __init__(self, engine: StandInEngine):
        from server.admission import Admission, AdmissionLimits
        from server.engine.loop import EngineLoop

        self.loop = EngineLoop(engine)
        self.model = SimpleNamespace(name="stand-in")
        self.admission = Admission(AdmissionLimits())  # no bounds: the bench measures the HTTP side

    def is_ready(self) -> bool:
        return self.loop.is_alive

    def is_base_model_name(self, name: str) -> bool:
        return name == self.model.name

    def completion_prompt_ids(self, prompt):
        return list(prompt)

    def check_length(self, num_prompt_tokens: int, max_tokens: int, *, where: str = "prompt") -> None:
        pass

    def stream(self, request, adapter_key):
        return self.loop.stream(request, adapter_key)


def serve(service: StandInService, port: int, http: str = "auto", loop: str = "auto") -> threading.Thread:
    import uvicorn

    from server.api.app import create_app
    from server.config import Settings

    app = create_app(Settings(device="cpu"))
    app.state.service = service
    # lifespan off: no model to load; the stand-in service takes its place
    config = uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="off", http=http, loop=loop)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn")
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=7.0)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--http", default="auto", help="uvicorn's HTTP implementation: auto | h11 | httptools")
    parser.add_argument("--loop", default="auto", help="uvicorn's event loop: auto | asyncio | uvloop")
    parser.add_argument("--out", default=os.environ.get("OUT", "loadtest/results"))
    args = parser.parse_args()
    from loadtest.server_process import free_port

    engine = StandInEngine(args.step_ms / 1000, max_num_seqs=args.streams)
    service = StandInService(engine)
    service.loop.start()
    port = free_port(HOST)
    serve(service, port, args.http, args.loop)
    time.sleep(1.0)
    now = time.monotonic()
    spec = LoadSpec(url=f"http://{HOST}:{port}/v1/completions", model="stand-in", tenants=(), concurrency=args.streams,
                    prompt_tokens=8, max_tokens=args.tokens, token_range=(1, 1000), seed="http-side",
                    start_at=now + 1.0, stop_issuing_at=now + 1.0 + args.duration,
                    cancel_at=now + 1.0 + args.duration + 60, request_timeout_s=60.0)
    ids = list(range(args.streams))
    groups = [ids[i :: args.client_procs] for i in range(args.client_procs)]
    cpu0, wall0 = time.process_time(), time.monotonic()
    with multiprocessing.get_context("spawn").Pool(len(groups)) as pool:
        results = pool.starmap(run_clients, [(spec, g) for g in groups])
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    service.loop.stop()
    records = [r for res in results for r in res["records"]]
    tokens = sum(r.tokens or 0 for r in records if r.ok)
    errors = sum(1 for r in records if not r.ok)
    periods = engine.step_periods[5:]
    report = {
        "command": "PYTHONPATH=. python3 loadtest/bench_http_side.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "streams": args.streams, "step_ms": args.step_ms, "http": args.http, "loop": args.loop, "output_tokens": tokens, "errors": errors,
        "tokens_per_s": tokens / wall, "ideal_tokens_per_s": args.streams / (args.step_ms / 1000),
        "step_period_ms_p50": 1000 * statistics.median(periods) if periods else None,
        "step_period_ms_p90": 1000 * statistics.quantiles(periods, n=10)[-1] if len(periods) > 10 else None,
        "server_cpu_us_per_token": 1e6 * cpu / tokens if tokens else None,
        "server_cpu_share_of_one_core": cpu / wall,
    }
    print(json.dumps(report, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"http_side_{args.streams}x{args.step_ms:g}ms_{args.http}_{args.loop}.json"
    Path(args.out, name).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
