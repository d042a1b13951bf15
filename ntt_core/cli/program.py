"""The ``ntt`` program: its parser, one subcommand per module, and :func:`main`."""

from __future__ import annotations

import argparse
import sys

from ..errors import NttError
from .build_memory import add_parser as add_build_memory
from .demo import add_parser as add_demo
from .evaluate import add_parser as add_evaluate
from .models import add_parser as add_models
from .options import EXIT_BAD_INPUT, EXIT_HELP, EXIT_INTERRUPTED, EXIT_OK, HelpFormatter, Interrupted
from .output import log_warnings_to_stderr
from .predict import add_parser as add_predict
from .sample_references import add_parser as add_sample_references
from .shards import add_parser as add_shards
from .track import add_parser as add_track

#: The subcommands, in the order ``ntt --help`` lists them.
COMMANDS = (
    add_sample_references,
    add_build_memory,
    add_predict,
    add_evaluate,
    add_track,
    add_demo,
    add_models,
    add_shards,
)


def main(argv: list[str] | None = None) -> int:
    """Run one ``ntt`` subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    log_warnings_to_stderr()
    try:
        return args.command(args) or EXIT_OK
    except (Interrupted, KeyboardInterrupt) as stop:
        print(f"ntt: interrupted{': ' + str(stop) if str(stop) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (NttError, OSError) as error:  # bad input: one line, nothing done
        reason = " ".join(str(error).split())
        print(f"ntt: error: {reason}", file=sys.stderr)
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntt",
        description="Training-free reference-based instance segmentation (No Time to Train!) on COCO-format folders.",
        epilog=EXIT_HELP,
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands, HelpFormatter)
    return parser
