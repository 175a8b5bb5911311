"""`loraplex` command line: prepare-model, generate, serve."""

from __future__ import annotations

import argparse
import sys

from server.config import Settings


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF Llama-family checkpoint directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--home", help="where prepared models and adapters live (default ~/.cache/loraplex)")


def _settings(args: argparse.Namespace, **extra) -> Settings:
    return Settings.from_env(model=args.model, home=args.home, **extra)


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from server.model.prepare import ModelPreparationError, prepare_model

    settings = _settings(args)
    try:
        path = prepare_model(settings, settings.model)
    except ModelPreparationError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, SamplingParams

    settings = _settings(args, device=args.device)
    engine = Engine.from_settings(settings)
    adapters = {}
    if args.adapter:
        engine.add_adapter("cli", args.adapter)
        adapters = {"adapter": "cli"}
    request = GenerationRequest(
        prompt=args.prompt,
        chat=not args.raw,
        sampling=SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed),
        **adapters,
    )
    (result,) = engine.generate([request])
    print(result.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="fetch and convert the base model once (idempotent)")
    _add_common(p)
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("generate", help="run one prompt through the engine (no HTTP)")
    _add_common(p)
    p.add_argument("prompt", nargs="?", default="What is the capital of France?")
    p.add_argument("--adapter", help="a PEFT adapter directory to apply")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.set_defaults(func=cmd_generate)

    # Until the HTTP API lands, `serve` prepares the model and runs one generation.
    p = sub.add_parser("serve", help="prepare the model and serve it")
    _add_common(p)
    p.add_argument("prompt", nargs="?", default="What is the capital of France?")
    p.add_argument("--device")
    p.set_defaults(func=cmd_generate, adapter=None, max_tokens=64, temperature=0.0, seed=None, raw=False)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
