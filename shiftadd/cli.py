"""The ``shiftadd`` command.

    shiftadd pipeline [--quick]        the main job: search, retrain, report (digits by default)
    shiftadd search ...                NAS over a weight-sharing supernet (evo, darts, random)
    shiftadd retrain --arch best.json  train a searched architecture from scratch (--augment: ShiftAddAug)
    shiftadd rank ...                  supernet ranking quality (Kendall tau, naive vs hetero sharing)
    shiftadd augment-compare --arch A  ShiftAddAug against direct training of the same tiny net (3 seeds)
    shiftadd train ...                 train a model of the zoo (resnet20/32/56, vgg_small x 4 variants)
    shiftadd energy ARCH.json | --model NAME ...   per-layer energy table
    shiftadd profile-latency ...       measure (and cache) the latency table of this device
    shiftadd bench [adder|shift|nas]   kernels versus references and today's implementations; nas: end to end
    shiftadd info                      versions and backends (python -m shiftadd.info)

`shiftadd <command> --help` describes each.
"""

from __future__ import annotations

import sys

COMMANDS = ("pipeline", "search", "retrain", "rank", "augment-compare", "train", "energy", "profile-latency", "bench",
            "info")


def _energy(argv) -> int:
    """`shiftadd energy ARCH.json` (a searched architecture) or `--model NAME ...` (the zoo)."""
    from .nas import cost

    # an architecture file is a positional .json argument (not the value of --json), anywhere
    positional = [x for i, x in enumerate(argv) if not x.startswith("-") and (i == 0 or argv[i - 1] != "--json")]
    if "--model" not in argv and any(x.endswith(".json") for x in positional):
        import argparse
        import json

        from .nas.net import GeneNet
        from .nas.pipeline import load_arch

        p = argparse.ArgumentParser(prog="shiftadd energy ARCH.json")
        p.add_argument("arch")
        p.add_argument("--precision", default="fp32", choices=cost.PRECISIONS)
        p.add_argument("--convention", default="paper", choices=cost.CONVENTIONS)
        p.add_argument("--count-aux", action="store_true", help="also count BatchNorm, ReLU and pooling (per element)")
        p.add_argument("--json", metavar="FILE", help="also write the per-layer costs as JSON")
        a = p.parse_args(argv)
        space, gene = load_arch(a.arch)
        shape = (space.in_channels, space.image_size, space.image_size)
        costs = cost.layer_costs(GeneNet(space, gene), shape, a.precision, a.convention, count_aux=a.count_aux)
        print(cost.energy_table(costs))
        if a.json:
            data = {"arch": a.arch, "input": list(shape), "precision": a.precision, "convention": a.convention,
                    "total_uj": sum(c.energy_uj for c in costs),
                    "layers": [{"name": c.name, "op": c.op, "macs": c.macs, "energy_uj": c.energy_uj} for c in costs]}
            with open(a.json, "w") as f:
                json.dump(data, f, indent=1)
        return 0
    return cost.main_energy(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from ._cli import RunError

    try:
        return _run(argv[0], argv[1:])
    except RunError as e:  # a run's settings or files: the message says what and where
        print(f"shiftadd {argv[0]}: error: {e}", file=sys.stderr)
        return 2


def _run(cmd: str, rest: list) -> int:
    if cmd == "info":
        from .info import main as info_main

        return info_main(rest)
    if cmd == "train":
        from .train import main as train_main

        return train_main(rest)
    if cmd == "energy":
        return _energy(rest)
    if cmd == "profile-latency":
        from .nas.cost import main_profile_latency

        return main_profile_latency(rest)
    if cmd in ("pipeline", "search", "retrain", "rank", "augment-compare"):
        from .nas.pipeline import main as nas_main

        return nas_main(cmd, rest)
    which = "all"
    if rest and rest[0] in ("adder", "shift", "nas", "all"):
        which, rest = rest[0], rest[1:]
    elif rest and rest[0] in ("-h", "--help"):
        print("shiftadd bench [adder|shift|nas|all] [options]: `shiftadd bench adder --help` etc. for each table's "
              "options (all = adder then shift)")
        return 0
    from .bench import adder, nas, shift

    if which == "nas":
        return nas.main(rest)
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
