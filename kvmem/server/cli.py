"""``kvmem serve``: build the engine from command-line options and serve it over HTTP.

``add_parser(subparsers)`` adds the ``serve`` sub-command to ``kvmem``'s
parser; ``python -m kvmem.server`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvmem.engine import PRESETS, Engine, EngineConfig, load_model, load_tokenizer, random_model
from kvmem.engine.tokenizer import ByteTokenizer, Tokenizer
from kvmem.errors import KVError
from kvmem.formats import FORMAT_NAMES

_DESCRIPTION = (
    "Serve the kvmem engine over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, "
    "/v1/models, /health, /metrics); --kv-events publishes KV cache events on ZeroMQ."
)
_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``kvmem serve``."""
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        metavar="DIR",
        help="a local Llama/Mistral/Qwen2 checkpoint (config.json + *.safetensors)",
    )
    src.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="a random-weight model of this size (default: tiny)",
    )
    p.add_argument("--served-model-name", help="the model name clients send (default: derived)")
    p.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default="auto",
        help="compute dtype (auto: the checkpoint's, float32 for presets)",
    )
    p.add_argument("--seed", type=int, default=0, help="random weights and default sampling seed")
    p.add_argument(
        "--instances",
        type=int,
        default=1,
        help="engine instances (processes) behind one endpoint, with live migration (Llumnix)",
    )
    p.add_argument(
        "--prefill-instances",
        type=int,
        default=0,
        help="disaggregated serving (DistServe): prefill instances, with --decode-instances",
    )
    p.add_argument(
        "--decode-instances",
        type=int,
        default=0,
        help="decode instances taking each request's KV from a prefill instance",
    )
    p.add_argument("--backend", default="paged", help="KV backend: paged, vmem, grouped, ...")
    p.add_argument(
        "--backend-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra backend option, e.g. page_size=16 (repeatable)",
    )
    p.add_argument("--kv-format", choices=FORMAT_NAMES, default="auto", help="KV cache format")
    p.add_argument("--num-kv-tokens", type=int, default=16384, help="KV pool capacity in tokens")
    p.add_argument(
        "--policy", choices=("fcfs", "isrtf", "fair"), default="fcfs", help="scheduling policy"
    )
    p.add_argument("--preemption", choices=("recompute", "swap"), default="recompute")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests per batch")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="token budget per step (chunked prefill)",
    )
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="admitted requests allowed to wait for their first token; more get 429",
    )
    p.add_argument(
        "--max-n",
        type=int,
        default=16,
        help="the most samples per prompt a request may ask for (n, best_of); more get 400",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--attention-impl", default="auto", help="attention kernels: auto, reference, ..."
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("KVMEM_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $KVMEM_API_KEY; none)",
    )
    p.add_argument(
        "--metrics-need-key", action="store_true", help="put /metrics behind the API key too"
    )
    p.add_argument(
        "--kv-events",
        metavar="ENDPOINT",
        default=None,
        help="publish KV cache events (vLLM's schema) on this ZeroMQ endpoint, "
        "e.g. tcp://127.0.0.1:5557 (default: off)",
    )
    p.add_argument("--kv-events-topic", default="kv-events", help="ZeroMQ topic of the KV events")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to a parser's sub-commands (its handler is :func:`run`)."""
    p = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API over the engine",
        description=_DESCRIPTION,
    )
    add_arguments(p)
    p.set_defaults(fn=run)
    return p


def _option_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _backend_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KVError(f"--backend-option wants KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = _option_value(value.strip())
    return out


@dataclass
class Built:
    """What ``kvmem serve`` serves: the engine, the model's public name, its checkpoint dir."""

    engine: Engine
    model_name: str
    model_dir: Path | None


def build_engine(args: argparse.Namespace) -> Built:
    """The engine the options describe (a KVError for bad options)."""
    dtype = _DTYPES[args.dtype]
    tokenizer: Tokenizer
    if args.model:
        model_dir = Path(args.model)
        model = load_model(model_dir, dtype=dtype, device=args.device)
        tokenizer = load_tokenizer(model_dir, model.config.eos_token_ids)
        name = args.served_model_name or model_dir.resolve().name
    else:
        model_dir = None
        preset = args.preset or "tiny"
        model = random_model(preset, seed=args.seed, dtype=dtype, device=args.device)
        tokenizer = ByteTokenizer()
        name = args.served_model_name or f"kvmem-{preset}"
    config = EngineConfig(
        backend=args.backend,
        backend_options=_backend_options(args.backend_option),
        kv_format=args.kv_format,
        num_kv_tokens=args.num_kv_tokens,
        device=args.device,
        policy=args.policy,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        preemption=args.preemption,
        max_model_len=args.max_model_len,
        attention_impl=args.attention_impl,
        seed=args.seed,
        finished_history=1024,  # a long-running server keeps only recent finished requests
    )
    return Built(Engine(model, config, tokenizer=tokenizer), name, model_dir)


def build_app(args: argparse.Namespace) -> Any:
    """The FastAPI app for the options (the engine thread starts with the app)."""
    from kvmem.server.app import create_app
    from kvmem.server.chat import ChatTemplate
    from kvmem.server.runner import AsyncEngine

    if args.max_queue < 1:
        raise KVError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.max_n < 1:
        raise KVError(f"--max-n must be at least 1, got {args.max_n}")
    if args.api_key is not None and not args.api_key.strip():
        raise KVError("--api-key must not be empty")
    if args.metrics_need_key and args.api_key is None:
        raise KVError("--metrics-need-key needs --api-key (or KVMEM_API_KEY)")
    if args.instances < 1:
        raise KVError(f"--instances must be at least 1, got {args.instances}")
    pre, dec = args.prefill_instances, args.decode_instances
    if pre or dec:
        if pre < 1 or dec < 1:
            raise KVError(
                "--prefill-instances and --decode-instances go together, each at least 1; "
                f"got {pre} and {dec}"
            )
        if args.instances > 1:
            raise KVError("--instances is for colocated instances; not with --prefill-instances")
    built = build_engine(args)
    engine: Any = built.engine
    if args.instances > 1 or pre:
        from kvmem.cluster.serving import ClusterEngine

        n = pre + dec if pre else args.instances
        engine = ClusterEngine(built.engine, n, migrate=not pre, prefill=pre)
    runner = AsyncEngine(engine, max_queue=args.max_queue)
    try:
        return create_app(
            runner,
            built.model_name,
            ChatTemplate.from_dir(built.model_dir),
            api_key=args.api_key,
            guard_metrics=args.metrics_need_key,
            max_n=args.max_n,
            kv_events=args.kv_events,
            kv_events_topic=args.kv_events_topic,
        )
    except BaseException:
        engine.close()  # e.g. a --kv-events endpoint that cannot be bound
        raise


def run(args: argparse.Namespace) -> int:
    """``kvmem serve``: serve until interrupted; 2 on bad options."""
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully and re-raised it
        return 0


def _run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(
            f"kvmem serve needs the server extra (pip install 'kvmem[server]'): {e}",
            file=sys.stderr,
        )
        return 2
    from kvmem.server.launch import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        app = build_app(args)
    except (KVError, ValueError, OSError) as e:
        print(f"kvmem serve: {e}", file=sys.stderr)
        return 2
    state = app.state.kvmem
    eng = state.runner.engine
    logging.getLogger("kvmem.server").info(
        "serving %s on http://%s:%d (backend %s, kv format %s, %d KV tokens, policy %s)",
        state.model_name,
        args.host,
        args.port,
        eng.config.backend,
        eng.config.kv_format,
        eng.kv_capacity_tokens,
        eng.config.policy,
    )
    serve(app, args.host, args.port, args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmem.server [options]``: the ``serve`` command on its own."""
    p = argparse.ArgumentParser(prog="python -m kvmem.server", description=_DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


__all__ = ["add_arguments", "add_parser", "build_app", "build_engine", "main", "run"]
