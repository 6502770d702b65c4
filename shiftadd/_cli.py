"""Shared pieces of the command-line tools: argparse value types that name the rule they
enforce (argparse prefixes the option: "argument --epochs: must be >= 1, got 0"),
RunError, the error of a run's settings or files (the ``shiftadd`` commands print its
message and exit with status 2 instead of a traceback), and the checkpoint reading and
settings comparison that train and search resume with."""

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


def read_checkpoint(path: str) -> dict:
    """torch.load of a run's checkpoint on the CPU (RNG states must stay there); RunError
    naming the file when it cannot be read (cut short by a kill during a non-atomic copy,
    another file)."""
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # zip reader, unpickling, OS errors: all mean an unusable file
        raise RunError(f"cannot read the checkpoint {path} ({type(e).__name__}: {e}); remove it to start over, "
                       "or run without --resume") from e
    if not isinstance(ck, dict):
        raise RunError(f"{path} is not a checkpoint of this tool (a {type(ck).__name__}); remove it or run without "
                       "--resume")
    return ck


def settings_diff(old, new, prefix: str = "") -> list:
    """'key: old -> new' for each leaf where two settings dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += settings_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]
