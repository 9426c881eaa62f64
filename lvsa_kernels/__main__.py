"""Command line: ``python -m lvsa_kernels <command>`` (also installed as ``lvsa-kernels``).

Each command lives in ``lvsa_kernels/commands/<name>.py`` and defines ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``. Command modules import torch and the kernels inside ``run``, so ``--help`` stays
light. Bad values are usage errors (exit 2): per option through the types in ``commands._args``, and for
combinations through ``UsageError`` raised by ``run``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from .commands._args import UsageError

COMMANDS = ["demo", "plan", "profile", "backends", "tune", "generate", "tiny-pipeline"]


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser (each command's arguments included); parsing runs nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m lvsa_kernels", description="LVSA / SVOO block-sparse attention for long-video diffusion "
        "transformers. New here? Run 'python -m lvsa_kernels demo'; '<command> --help' shows a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"lvsa_kernels.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run, command_parser=p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        args.command_parser.error(str(exc))  # exits 2


if __name__ == "__main__":
    sys.exit(main())
