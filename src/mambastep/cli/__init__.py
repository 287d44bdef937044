"""The ``mambastep`` command: one entry point, one module per subcommand.

Each subcommand fills the same objects the library uses (``SamplingParams``, ``EngineSettings``,
``load`` arguments), so the command line and the API never disagree. Errors in what the user
passed are one line on stderr, naming the flags (not the fields they set), and a non-zero exit
status.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mambastep.cli import bench, compare, cost, generate, info, inspect, serve, stream, tasks, train
from mambastep.cli.common import USER_ERRORS, flag_names, in_flags

COMMANDS = (generate, info, serve, train, cost, compare, stream, bench, inspect, tasks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambastep", description="Constant-memory, real-time inference for selective state space models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for command_parser in sub.choices.values():  # an error names the flag a field came from
        command_parser.set_defaults(flags=flag_names(command_parser))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="mambastep: %(message)s", level=logging.WARNING)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"mambastep: error: {in_flags(str(err), args.flags)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
        sys.stderr.close()
        return 0
