"""`loraplex` command line: serve (the HTTP API), prepare-model, generate, merge."""

from __future__ import annotations

import argparse
import sys

from server.config import Settings


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF Llama-family checkpoint directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--home", help="where prepared models and adapters live (default ~/.cache/loraplex)")


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["nf4", "fp8", "none"],
                   help="quantize the base model's projection weights as they load: nf4 (QLoRA's 4-bit NormalFloat, "
                        "bitsandbytes' layout) or fp8 (e4m3, per-channel scales; tensor cores on Hopper); default none")


def _add_tensor_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", type=int,
                   help="split the base model over this many GPUs of the host (rank r on cuda:r; on the CPU, this "
                        "many processes); the attention heads, the KV heads and the intermediate size must divide "
                        "(default 1)")


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

    settings = _settings(args, device=args.device, quantize=args.quantize,
                         tensor_parallel_size=args.tensor_parallel_size)
    engine = Engine.from_settings(settings)
    try:
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
    finally:
        engine.close()
    print(result.text)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from server.lora.merge import MergeError, merge_adapter_dir
    from server.lora.peft import AdapterValidationError
    from server.model.prepare import ModelPreparationError, prepare_model

    settings = _settings(args)
    try:
        model_dir = prepare_model(settings, settings.model)
        out = merge_adapter_dir(args.adapter, model_dir, args.out)
    except (ModelPreparationError, MergeError, AdapterValidationError) as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Flags override LORAPLEX_* variables; unset flags leave them (and the defaults) alone.
    The admin token is only read from LORAPLEX_ADMIN_TOKEN: a flag would show in `ps`."""
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument("--device", help="auto | cpu | cuda[:N] (default auto: the GPU when there is one)")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    _add_quantize(p)
    _add_tensor_parallel(p)
    p.add_argument("--served-model-name", help="the base model's id in the API (default: its directory name)")
    p.add_argument("--adapter-store", help="adapter store directory (default <home>/adapters)")
    p.add_argument("--adapter-store-shared", action="store_const", const=True,
                   help="the adapter store is a volume shared by several replicas (see the README's Deployment)")
    p.add_argument("--api-keys-file", help='JSON {"<api key>": "<customer id>"}: require tenant API keys')
    p.add_argument("--max-loras", type=int, help="adapter slots on the device (default: 8 on the CPU; on the GPU as many as --lora-memory-fraction holds)")
    p.add_argument("--lora-memory-fraction", type=float,
                   help="share of GPU memory for adapter slots when --max-loras is not given (default 0.2)")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="share of GPU memory for weights, adapter slots and KV cache (default 0.9)")
    p.add_argument("--max-lora-rank", type=int, help="largest adapter rank accepted")
    p.add_argument("--lora-modules",
                   help="modules adapters may target, whose rows the device pool holds: all (default), attention "
                        "(q,k,v,o), mlp, or a comma-separated list of q_proj ... down_proj; fewer modules, more "
                        "adapters resident (a 70B page is 445 MB at rank 16 with all, 131 MB with attention)")
    p.add_argument("--max-num-seqs", type=int, help="sequences running at once (default 256 on the GPU, 32 on the CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's, at most 8192)")
    p.add_argument("--num-kv-blocks", type=int, help="KV cache blocks (default: derived)")
    p.add_argument("--host-cache-bytes", type=int, help="host RAM for the adapter cache")
    p.add_argument("--max-upload-bytes", type=int, help="largest adapter upload")
    p.add_argument("--max-queued-requests", type=int,
                   help="generations waiting for the engine, server-wide, beyond which requests get 429 (default 1024; 0: no bound)")
    p.add_argument("--max-queued-requests-per-tenant", type=int,
                   help="the same bound for one tenant (default 256; 0: no bound)")
    p.add_argument("--max-requests-per-tenant", type=int,
                   help="queued and running generations of one tenant (default 0: no bound)")
    p.add_argument("--max-connections", type=int,
                   help="open connections at once, past which uvicorn answers 503 (default 4096; 0: no bound)")
    p.add_argument("--drain-seconds", type=float,
                   help="after SIGTERM: how long requests in flight may finish (not ready, new requests 503) "
                        "before the rest end with an error and the server exits 0 (default 20)")
    p.add_argument("--max-request-seconds", type=float,
                   help="a generation request's deadline from its arrival (default 600; clients may ask for less "
                        "with X-Request-Timeout; 0: none)")
    p.add_argument("--max-queued-tokens", type=int,
                   help="prompt tokens of the queued generations, server-wide (default 1048576; 0: no bound)")
    p.add_argument("--max-queued-tokens-per-tenant", type=int,
                   help="the same bound for one tenant (default 262144; 0: no bound)")
    p.add_argument("--enforce-eager", action="store_const", const=True,
                   help="run decode steps without CUDA graphs (debugging; graphs are captured at start-up on the GPU)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_const", const=False,
                   help="compute every prompt in full (default: full KV blocks of a prefix already computed "
                        "for the same adapter are shared)")
    p.add_argument("--async-scheduling", choices=["auto", "on", "off"],
                   help="schedule the next step while the device runs this one (default auto: on the GPU)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


SERVE_SETTINGS = ("host", "port", "device", "dtype", "quantize", "served_model_name", "adapter_store", "api_keys_file",
                  "max_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                  "num_kv_blocks", "host_cache_bytes", "max_upload_bytes", "enforce_eager",
                  "lora_memory_fraction", "gpu_memory_utilization", "async_scheduling", "max_queued_requests",
                  "max_queued_requests_per_tenant", "max_requests_per_tenant", "max_queued_tokens",
                  "max_queued_tokens_per_tenant", "max_request_seconds", "max_connections", "drain_seconds",
                  "adapter_store_shared", "enable_prefix_caching", "lora_modules", "tensor_parallel_size")


def serve_settings(args: argparse.Namespace) -> Settings:
    return _settings(args, **{name: getattr(args, name) for name in SERVE_SETTINGS})


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from server.api.app import create_app, stop_engine_of, uvicorn_limits
    from server.api.drain import DrainingServer
    from server.model.prepare import ModelPreparationError, prepare_model

    try:
        settings = serve_settings(args)
        prepare_model(settings, settings.model)  # with a progress bar, before the server starts
        app = create_app(settings)
    except (ModelPreparationError, ValueError) as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if not settings.admin_token:
        print("loraplex: the admin API is disabled; set LORAPLEX_ADMIN_TOKEN to upload adapters", file=sys.stderr)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            timeout_graceful_shutdown=10, **uvicorn_limits(settings))
    DrainingServer(config, app.state.drain, lambda: stop_engine_of(app)).run()  # SIGTERM: drain, then exit 0
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    _add_quantize(p)
    _add_tensor_parallel(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="merge a PEFT LoRA/DoRA adapter into the base model: a plain checkpoint "
                                     "that `loraplex serve --model OUT` serves at base-model speed")
    _add_common(p)
    p.add_argument("--adapter", required=True, help="the PEFT adapter directory (adapter_config.json + "
                                                     "adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="directory to write the merged checkpoint to (must not exist)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="serve the HTTP API (OpenAI-compatible inference, admin, metrics)")
    _add_common(p)
    _add_serve_flags(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
