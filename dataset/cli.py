"""Command-line pieces of the dataset/ scripts (dataset/prepare.py): the --help layout and flag types with
one-line errors.

Every numeric flag takes one of these types, so a value out of range ends in argparse's one line ("argument
--test_fraction: must be in [0, 1], got 2") before anything is read, instead of a traceback or a silently
meaningless result. The stage scripts' flags have the same types in trainer/flags.py: dataset/ never imports
trainer/, and the trainer's flags do not come from dataset/.
"""

import argparse
import math
from typing import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's line breaks and ends a flag's line with its default (when it has one; the
    help of a flag without one says what happens without it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type factory: an integer >= low (and <= high when given)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value: 'x'"
    return parse


positive_int = int_in_range(1)  # counts of steps, samples, layers, ...
non_negative_int = int_in_range(0)  # counts where 0 means none (--warmup_steps, --num_workers)


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = float(text)
    if not (value > 0.0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0 (0 switches the thing off, e.g. --grad_clip 0, --weight_decay 0)."""
    value = float(text)
    if not (value >= 0.0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value
