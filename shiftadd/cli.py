"""The ``shiftadd`` command.

    shiftadd info                 versions and backends (python -m shiftadd.info)
    shiftadd bench [adder|shift]  kernels versus references and today's implementations
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="shiftadd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["info", "bench"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args(argv[:1])
    rest = argv[1:]
    if a.command == "info":
        from .info import main as info_main

        return info_main(rest)
    which = "all"
    if rest and rest[0] in ("adder", "shift", "all"):
        which, rest = rest[0], rest[1:]
    from .bench import adder, shift

    rc = 0
    if which in ("adder", "all"):
        rc |= adder.main(rest)
    if which in ("shift", "all"):
        if which == "all":
            print()
        rc |= shift.main(rest)
    return rc


if __name__ == "__main__":
    sys.exit(main())
