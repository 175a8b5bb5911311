"""What users run today: Hugging Face transformers' `generate` on the base model, and peft with
one adapter and with a mixed-adapter batch (`generate(adapter_names=...)`), timed on one batch.

    python3 -m loadtest.hf_baseline --checkpoint DIR --adapters DIR --out FILE.json
        [--batch 32] [--prompt-tokens 128] [--new-tokens 128] [--mixed-new-tokens 32]

The checkpoint and the peft adapter directories (sorted; the i-th serves row i of the mixed
batch, cycling) are the ones loraplex serves in the same benchmark (loadtest/bench_vs_peft.py).
Prompts are random token ids of one length (no padding), decoding is greedy and runs to the
full length (min_new_tokens = max_new_tokens: no early EOS). Each case is timed from the call to
`generate` to its return after a CUDA synchronize, prefill included; a short warm-up generate
runs first. A logits processor stamps the host time of every decode step, so the report also
has the step times of the first and second half (the mixed batch runs fewer tokens to save
device time; its steps show whether the per-token cost still moves with the context).

Runs in its own process so that its GPU memory is gone before the server starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


class StepClock:
    """A logits processor that records when each generation step's logits reach it."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--adapters", type=Path, required=True, help="directory of peft adapter directories")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--mixed-new-tokens", type=int, default=32,
                   help="new tokens for the mixed-adapter batch (peft's slowest case; default 32)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, prompts: torch.Tensor, new_tokens: int, **kwargs) -> dict:
    from transformers import LogitsProcessorList

    clock = StepClock()
    _sync(prompts.device)
    start = time.perf_counter()
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                         logits_processor=LogitsProcessorList([clock]), **kwargs)
    _sync(prompts.device)
    seconds = time.perf_counter() - start
    generated = out.shape[1] - prompts.shape[1]
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    half = len(steps) // 2
    return {
        "seconds": seconds, "new_tokens": generated, "batch": prompts.shape[0],
        "tokens_per_s": prompts.shape[0] * generated / seconds,
        "first_step_s": clock.times[0] - start if clock.times else None,  # prefill + the first token
        "decode_step_s": _median(steps),
        "decode_step_first_half_s": _median(steps[:half]), "decode_step_second_half_s": _median(steps[half:]),
    }


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import peft
    import transformers
    from packaging.version import Version
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "peft": peft.__version__},
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "batch": args.batch,
                    "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                    "mixed_new_tokens": args.mixed_new_tokens}
    say = lambda text: print(f"hf_baseline: {text}", flush=True)  # noqa: E731

    start = time.perf_counter()
    dtype_arg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, **{dtype_arg: torch.bfloat16}).to(device).eval()
    result["load_s"] = time.perf_counter() - start
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(min(1000, vocab // 2), vocab, (args.batch, args.prompt_tokens), generator=gen).to(device)

    with torch.inference_mode():
        timed_generate(model, prompts, 4)  # warm-up: kernels, allocator
        result["transformers_base"] = timed_generate(model, prompts, args.new_tokens)
        say(f"transformers base: {result['transformers_base']['tokens_per_s']:.0f} tok/s")

        adapter_dirs = sorted(d for d in args.adapters.iterdir() if (d / "adapter_config.json").is_file())
        names = [f"a{i:03d}" for i in range(len(adapter_dirs))]
        start = time.perf_counter()
        model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
        for name, folder in zip(names[1:], adapter_dirs[1:]):
            model.load_adapter(folder, adapter_name=name)
        model.eval()
        result["peft_adapters"] = len(names)
        result["peft_load_s"] = time.perf_counter() - start

        model.set_adapter(names[0])
        timed_generate(model, prompts, 4)
        result["peft_one_adapter"] = timed_generate(model, prompts, args.new_tokens)
        say(f"peft, one adapter: {result['peft_one_adapter']['tokens_per_s']:.0f} tok/s")

        rows = [names[i % len(names)] for i in range(args.batch)]
        timed_generate(model, prompts, 2, adapter_names=rows)
        result["peft_mixed"] = timed_generate(model, prompts, args.mixed_new_tokens, adapter_names=rows)
        say(f"peft, mixed batch of {len(set(rows))} adapters: {result['peft_mixed']['tokens_per_s']:.1f} tok/s")

    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
