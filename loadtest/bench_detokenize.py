"""Engine-thread CPU time per token of keeping each sequence's text: the incremental
detokenizer (the engine's `_finish_reason`) against re-decoding the whole output after every
token (what the engine did before), with and without stop strings.

    python loadtest/bench_detokenize.py [--seqs 64] [--tokens 256 1024] [--repeats 3]

No model runs: every sequence is fed the ids of real text (prose, code, CJK, emoji) as if
sampled, interleaved as in a decode step, on the default model's tokenizer.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.sequence import Sequence
from server.model.prepare import prepare_model

CORPUS = [
    "The river bends twice before it reaches the sea, and at each bend the town has built a bridge. "
    "In spring the water rises over the lower steps; children count them to guess the date.",
    "def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n"
    "    return out + a + b\n",
    "東京の朝は早い。電車は六時に動き出し、人々は静かに仕事へ向かう。北京的冬天很冷，但是阳光很好。",
    "Great job 🎉🚀! Café crème, naïve façade, Ærøskøbing — 5€ each. 👩‍👩‍👧‍👦 family tickets.",
    "1. Preheat the oven to 200°C.\n2. Mix the flour and butter.\n3. Bake for 25 minutes.\n\n",
]
STOPS = ("\n\nUser:", "<|endoftext|>")  # typical chat stops that never match here


def token_streams(tokenizer, num_seqs: int, num_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    ids = []
    while len(ids) < 4 * num_tokens:
        ids += tokenizer.encode(rng.choice(CORPUS), add_special_tokens=False)
    starts = [rng.randrange(len(ids) - num_tokens) for _ in range(num_seqs)]
    return [ids[s : s + num_tokens] for s in starts]


def finish_reason_full_decode(engine: Engine, seq: Sequence, token: int) -> str | None:
    """The engine's bookkeeping before the incremental detokenizer."""
    params = seq.sampling
    if token in engine.eos_ids and not params.ignore_eos:
        seq.output_ids.pop()
        seq.text = engine.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        return "stop"
    seq.text = engine.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
    for stop in params.stop:
        cut = seq.text.find(stop)
        if cut >= 0:
            seq.text = seq.text[:cut]
            return "stop"
    if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= engine.limits.max_model_len:
        return "length"
    return None


def cpu_seconds(engine: Engine, streams: list[list[int]], stops: tuple[str, ...],
                finish_reason) -> tuple[float, list[str]]:
    """CPU time of feeding every stream one token per step, all sequences each step."""
    params = SamplingParams(max_tokens=len(streams[0]), ignore_eos=True, stop=stops)
    seqs = [Sequence(request=GenerationRequest([1], params), prompt_ids=[1]) for _ in streams]
    start = time.process_time()
    for step in range(len(streams[0])):
        for seq, ids in zip(seqs, streams):
            seq.output_ids.append(ids[step])
            finish_reason(engine, seq, ids[step])
    return time.process_time() - start, [s.text for s in seqs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    settings = Settings.from_env()
    model_dir = prepare_model(settings, settings.model, progress=False)
    engine = Engine.from_dir(model_dir, Settings(max_model_len=max(args.tokens) + 8, num_kv_blocks=8, max_num_seqs=8))
    for num_tokens in args.tokens:
        streams = token_streams(engine.tokenizer, args.seqs, num_tokens)
        for stops in ((), STOPS):
            expected = [engine.tokenizer.decode(s, skip_special_tokens=True) for s in streams]
            times = {}
            for name, fn in (("full re-decode", finish_reason_full_decode), ("incremental", Engine._finish_reason)):
                runs = [cpu_seconds(engine, streams, stops, fn) for _ in range(args.repeats)]
                assert all(texts == expected for _, texts in runs)
                times[name] = statistics.median(t for t, _ in runs)
            per_token = {k: v / (args.seqs * num_tokens) * 1e6 for k, v in times.items()}
            print(f"{args.seqs} seqs x {num_tokens:4d} tokens, {len(stops)} stops: "
                  + " | ".join(f"{k} {us:6.1f} us/token" for k, us in per_token.items())
                  + f" | {per_token['full re-decode'] / per_token['incremental']:.1f}x")


if __name__ == "__main__":
    main()
