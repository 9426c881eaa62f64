"""Command line: ``python -m lvsa_kernels <command>`` (also installed as ``lvsa-kernels``).

Each command lives in ``lvsa_kernels/commands/<name>.py`` and defines ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

COMMANDS = ["demo", "plan", "profile", "backends", "tune"]
COMMANDS.append("generate")  # lvsa_kernels/commands/generate.py


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvsa_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"lvsa_kernels.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
