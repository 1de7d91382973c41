"""The `dspark` console script. Each subcommand lives in the component that owns it and exposes
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs,
so `dspark --help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dspark_common.errors import DSparkError

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("verifier_svc.generate_cli", "generate text in-process (target + drafter, no services)"),
    "up": ("router.up", "start router, verifier(s) and drafter(s) as child processes"),
    "router": ("router.server", "run the router (HTTP OpenAI-compatible + gRPC)"),
    "verifier": ("verifier_svc.server", "run a verifier (target model) gRPC service"),
    "drafter": ("drafter_svc.server", "run a drafter (DSpark) gRPC service"),
    "train": ("drafter_svc.train.cli", "the DSpark training pipeline (datagen, cache, fit, calibrate, export)"),
    "eval": ("drafter_svc.train.evaluate", "measure τ and acceptance by position of a drafter, in-process"),
    "bench": ("bench.harness", "benchmark the stack over HTTP"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dspark", add_help=False)
    parser.add_argument("command", nargs="?")
    first, _ = parser.parse_known_args(argv[:1])
    full = argparse.ArgumentParser(prog="dspark", description="Lossless speculative decoding with DSpark.")
    full.add_argument("--log-level", default="INFO")
    sub = full.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == first.command:
            importlib.import_module(module).add_arguments(p)
    args = full.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except DSparkError as e:
        print(f"dspark {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
