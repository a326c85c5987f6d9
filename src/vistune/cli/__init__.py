"""The `vistune` command. Each module in this package registers one group of
subcommands; a subcommand only parses its arguments and delegates to the library."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define `register(subparsers)`; imported lazily so `vistune --help`
# stays fast and one broken optional extra never takes the whole CLI down.
COMMAND_MODULES = ["data", "train", "infer", "serve", "eval", "interop", "demo"]


class CommandError(Exception):
    """A mistake in what the user gave a command (a path that is no model, say): reported as
    one ``error:`` line, without a traceback, and exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="vistune", description="Visual instruction tuning (LLaVA), end to end.")
    parser.add_argument("--version", action="version", version=f"vistune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
