"""Shared pieces of the command-line tools: argparse value types that name the rule they
enforce (argparse prefixes the option: "argument --epochs: must be >= 1, got 0"), and
RunError, the error of a run's settings or files (the ``shiftadd`` commands print its
message and exit with status 2 instead of a traceback)."""

from __future__ import annotations

import argparse
import math


class RunError(ValueError):
    """A run's settings or files do not fit: --resume with other settings, an unreadable
    checkpoint, a space file with bad values, ..."""


def int_min(lo: int):
    """argparse type: an integer >= lo."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def float_min(lo: float, inclusive: bool = True):
    """argparse type: a finite float >= lo (> lo when not inclusive)."""

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
        if not math.isfinite(v) or v < lo or (v == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {lo}, got {s}")
        return v

    parse.__name__ = f"number {'>=' if inclusive else '>'} {lo}"
    return parse


def check_device(option: str, device: str) -> str:
    """`device` when torch can use it here, else RunError naming the option."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RunError(f"{option} {device!r}: not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"{option} {device}: no CUDA device here (torch {torch.__version__}, CUDA "
                       f"{torch.version.cuda or 'not built'})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RunError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
