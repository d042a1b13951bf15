"""What the commands share: the CLI's errors and exit statuses, argparse types that apply the
library's input rules, the help formatter, and the model options with the loading they drive
(also used by ``ntt demo``, ``ntt shards`` and the benchmarks)."""

from __future__ import annotations

import argparse
import dataclasses

from ..errors import NttError
from ..input_rules import InputError, check_count, check_seed
from ..settings import Settings

PAPER = Settings()  # the paper's defaults

#: Exit statuses (see :mod:`ntt_core.cli`).
EXIT_OK, EXIT_ALL_FAILED, EXIT_BAD_INPUT, EXIT_SOME_SKIPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_HELP = (
    "exit status: 0 done; 1 every image failed (nothing written); 2 bad input (one line, nothing done); "
    "3 done, but some images were skipped (their count and first reasons on stderr); "
    "130 interrupted (predict: run the same command with --resume to finish)"
)


class CliError(NttError):
    """A command-line input the commands cannot use (e.g. an unavailable device)."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C; the message says what was kept and how to go on."""


# --- argument types ---


def count_option(name: str):
    """An argparse type for a count of at least 1: the library's rule (:func:`ntt_core.input_rules.check_count`)
    with its message about ``name``, the parameter's name in the Python API and the App's forms."""

    def count(text: str) -> int:
        return _ruled(lambda value: check_count(value, name), text)

    return count


shots_option = count_option("shots")


def seed_option(text: str) -> int:
    """``--seed``: the library's rule (:func:`ntt_core.input_rules.check_seed`), as an argparse type."""
    return _ruled(check_seed, text)


def _ruled(rule, text: str) -> int:
    try:
        return rule(int(text))
    except ValueError as error:  # not an integer, or the rule's message
        message = str(error) if isinstance(error, InputError) else f"{text!r} is not an integer"
        raise argparse.ArgumentTypeError(message) from None


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number > 0")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def class_choice(text: str) -> str | list[str]:
    """``few-shot`` / ``all`` / comma-separated class names."""
    if text in ("few-shot", "all"):
        return text
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give few-shot, all, or comma-separated class names")
    return names


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except absent ones (None) and off switches."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# --- the model options and what they load ---


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument(
        "--sam2",
        help="SAM2: short name (sam2-large, sam2.1-tiny...), hub id, local folder or Meta .pt (default: the paper's Hiera-L)",
    )
    group.add_argument(
        "--dinov2",
        help="DINOv2: short name (dinov2-large...), hub id, local folder or Meta .pth (default: the paper's ViT-L/14)",
    )
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="compute dtype (auto: float32, as the authors ran; bfloat16 is faster on GPUs and AMX CPUs, unmeasured for accuracy)",
    )
    group.add_argument(
        "--encoder-size",
        type=count_option("encoder_size"),
        help="DINOv2 input side in pixels (default: the model's, 518)",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """The paper's settings with the options this command has."""
    names = [field.name for field in dataclasses.fields(Settings) if hasattr(args, field.name)]
    return PAPER.replace(**{name: getattr(args, name) for name in names})


def load_device(name: str):
    from ..models import choose_device

    try:
        return choose_device(name)
    except RuntimeError as error:  # an unknown or unavailable device
        raise CliError(f"--device {name}: {error}") from None


def load_segmenter(args: argparse.Namespace, device, settings: Settings):
    from ..models import load_segmenter

    return load_segmenter(args.sam2, device, args.dtype, settings.add_no_memory_embedding)


def load_encoder(args: argparse.Namespace, device, input_size: int | None):
    from ..models import load_encoder

    return load_encoder(args.dinov2, device, args.dtype, input_size)
