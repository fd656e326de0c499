"""The ``kvmem`` command: ``demo``, ``serve``, ``bench``, ``info``."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch
from rich.console import Console


def _demo(args: argparse.Namespace) -> int:
    from kvmem.engine.demo import run

    figs = run(
        backend=args.backend,
        num_requests=args.requests,
        num_tokens=args.kv_tokens,
        seed=args.seed,
        kv_format=args.kv_format,
        policy=args.policy,
        chunk=args.chunk,
        preset=args.preset,
    )
    print()
    Console().print(
        f"served {figs['requests']} requests, {figs['tokens']} tokens in {figs['steps']} "
        f"steps ({figs['preempted']} preemptions); prefix-cache hit rate "
        f"{figs['prefix_hit_rate']:.0%}; "
        f"KV in use after the run: {figs['used_after']} slots"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent / "bench"
    script = root / f"{args.name}.py"
    if not script.exists():
        names = sorted(p.stem for p in root.glob("*.py") if p.stem not in ("common", "__init__"))
        print(
            f"no benchmark {args.name!r}; in a source checkout: {', '.join(names) or 'none'}",
            file=sys.stderr,
        )
        return 2
    if str(root.parent) not in sys.path:  # bench is a package beside kvmem in a checkout
        sys.path.insert(0, str(root.parent))
    sys.argv = [f"bench.{args.name}", *args.rest]
    runpy.run_module(f"bench.{args.name}", run_name="__main__", alter_sys=True)
    return 0


def _info(args: argparse.Namespace) -> int:
    import kvmem
    import kvmem.native
    from kvmem.formats import FORMAT_NAMES

    c = Console()
    c.print(f"kvmem {kvmem.__version__}, torch {torch.__version__}")
    c.print("backends:")
    for name in kvmem.available_backends():
        try:
            caps = ", ".join(kvmem.backend_class(name).capabilities.names()) or "core contract"
        except Exception as e:  # a third-party backend that fails to import
            caps = f"unavailable ({e})"
        c.print(f"  {name}: {caps}")
    c.print(f"kv formats: {', '.join(FORMAT_NAMES)}")
    c.print(f"native primitives: {kvmem.native.status()}", soft_wrap=True)
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    c.print(f"CUDA device: {cuda}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kvmem`` and ``python -m kvmem``."""
    ap = argparse.ArgumentParser(prog="kvmem", description="KV-cache memory for LLM serving")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="generate for a stream of requests and show KV usage")
    d.add_argument("--backend", default="paged")
    d.add_argument("--kv-format", default="auto")
    d.add_argument("--policy", default="fcfs")
    d.add_argument("--chunk", type=int, default=64, help="token budget per step")
    d.add_argument("--preset", default="tiny", help="random-weight model size")
    d.add_argument("--requests", type=int, default=48)
    d.add_argument("--kv-tokens", type=int, default=4096)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_demo)
    b = sub.add_parser("bench", help="run python -m bench.<name> from a source checkout")
    b.add_argument("name")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_bench)
    i = sub.add_parser("info", help="versions, backends, formats, devices")
    i.set_defaults(fn=_info)
    from kvmem.server.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    args = ap.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
