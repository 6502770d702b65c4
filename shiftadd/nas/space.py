"""Search spaces and architecture genes.

A network of the space is: a multiplicative stem conv (as AdderNet keeps the first
layer), then stages of searchable layers, then global average pooling and a
multiplicative classifier.  Each searchable layer is ``op(kernel) -> BN -> ReLU`` with a
residual connection when its input and output shapes agree; the first layer of a stage
may change the width and apply the stage's stride.  Per layer the gene chooses

* ``op``: one of the space's operators among conv, shift, adder, shiftadd and skip
  (skip is the identity, allowed only where shapes agree);
* ``k``: the kernel size;

and per stage the gene chooses the width.  A gene is a JSON-able dict::

    {"space": "digits", "stem": 16,
     "widths": [16, 32, 48],
     "layers": [{"op": "adder", "k": 3}, {"op": "skip", "k": 3}, ...]}

``layers`` lists the layers of all stages in order; ``SearchSpace.layer_plan`` gives each
one's stage, stride and whether skip is allowed there.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence

from .._cli import RunError

OPS = ("conv", "shift", "adder", "shiftadd", "skip")
MULT_FREE = ("shift", "adder", "shiftadd", "skip")


@dataclass(frozen=True)
class StageSpec:
    """`depth` searchable layers; the first applies `stride` and changes the width."""
    depth: int
    widths: tuple
    stride: int = 1


@dataclass(frozen=True)
class LayerSlot:
    index: int
    stage: int
    stride: int
    first: bool  # first layer of its stage (the width may change there)


@dataclass
class SearchSpace:
    name: str
    stages: tuple
    ops: tuple = ("conv", "shift", "adder", "shiftadd", "skip")
    kernels: tuple = (3, 5)
    stem: int = 16
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 8
    # per-layer operator restriction (preset-specific), e.g. the ShiftAddAug net
    layer_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        where = f"search space {self.name!r}"
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise RunError(f"{where}: stages must be a non-empty list, got {self.stages!r}")
        stages = []
        for i, st in enumerate(self.stages):
            if not isinstance(st, StageSpec):
                if not isinstance(st, dict) or not {"depth", "widths"} <= set(st) or set(st) - {"depth", "widths",
                                                                                                  "stride"}:
                    raise RunError(f"{where}: stage {i} must have depth, widths and optionally stride, got {st!r}")
                st = StageSpec(st["depth"], _int_list(where, f"stage {i} widths", st["widths"]), st.get("stride", 1))
            stages.append(StageSpec(_int_at_least(where, f"stage {i} depth", st.depth, 1),
                                    _int_list(where, f"stage {i} widths", st.widths),
                                    _int_at_least(where, f"stage {i} stride", st.stride, 1)))
        self.stages = tuple(stages)
        if not isinstance(self.ops, (list, tuple)) or not self.ops:
            raise RunError(f"{where}: ops must be a non-empty list of operators from {OPS}, got {self.ops!r}")
        self.ops = tuple(self.ops)
        bad = [o for o in self.ops if o not in OPS]
        if bad or len(set(self.ops)) != len(self.ops):
            raise RunError(f"{where}: ops {list(self.ops)}: unknown or repeated operators; choose from {OPS}")
        if all(o == "skip" for o in self.ops):
            raise RunError(f"{where}: ops needs an operator besides skip (a stride or width change cannot skip)")
        self.kernels = _int_list(where, "kernels", self.kernels)
        if any(k % 2 == 0 for k in self.kernels):
            raise RunError(f"{where}: kernels must be odd (padding k // 2 keeps the size), got {list(self.kernels)}")
        for name in ("stem", "in_channels", "num_classes", "image_size"):
            setattr(self, name, _int_at_least(where, name, getattr(self, name), 1))
        if not isinstance(self.layer_kwargs, dict):
            raise RunError(f"{where}: layer_kwargs must be a mapping, got {self.layer_kwargs!r}")

    # ----------------------------------------------------------------------------------

    def layer_plan(self) -> list:
        plan, i = [], 0
        for si, st in enumerate(self.stages):
            for d in range(st.depth):
                plan.append(LayerSlot(i, si, st.stride if d == 0 else 1, d == 0))
                i += 1
        return plan

    def skip_allowed(self, slot: LayerSlot, widths: Sequence[int]) -> bool:
        """Identity only where the layer keeps the shape."""
        if slot.stride != 1:
            return False
        if not slot.first:
            return True
        c_in = self.stem if slot.stage == 0 else widths[slot.stage - 1]
        return c_in == widths[slot.stage]

    def layer_ops(self, slot: LayerSlot, widths: Sequence[int]) -> tuple:
        ops = self.ops
        if not self.skip_allowed(slot, widths):
            ops = tuple(o for o in ops if o != "skip")
        return ops or ("conv",)

    def max_widths(self) -> list:
        return [max(s.widths) for s in self.stages]

    # ----------------------------------------------------------------------------------
    # genes
    # ----------------------------------------------------------------------------------

    def sample(self, rng: random.Random) -> dict:
        widths = [rng.choice(s.widths) for s in self.stages]
        layers = [{"op": rng.choice(self.layer_ops(slot, widths)), "k": rng.choice(self.kernels)}
                  for slot in self.layer_plan()]
        return self.gene(widths, layers)

    def gene(self, widths, layers) -> dict:
        return {"space": self.name, "stem": self.stem, "widths": list(widths), "layers": [dict(l) for l in layers]}

    def uniform(self, op: str, k: Optional[int] = None, widths=None) -> dict:
        """Every layer the same operator; where it is not allowed (skip on a stride, an
        operator outside the space), the space's first operator that is."""
        widths = list(widths or self.max_widths())
        k = k or self.kernels[0]
        layers = []
        for slot in self.layer_plan():
            allowed = self.layer_ops(slot, widths)
            layers.append({"op": op if op in allowed else allowed[0], "k": k})
        return self.gene(widths, layers)

    def validate(self, gene: dict) -> dict:
        """Checks a gene against the space; returns it (normalised) or raises ValueError."""
        if gene.get("space") not in (None, self.name):
            raise ValueError(f"gene is for space {gene.get('space')!r}, not {self.name!r}")
        widths = list(gene.get("widths", []))
        if len(widths) != len(self.stages):
            raise ValueError(f"gene has {len(widths)} stage widths, the space has {len(self.stages)} stages")
        for w, st in zip(widths, self.stages):
            if w not in st.widths:
                raise ValueError(f"width {w} is not among the stage's choices {st.widths}")
        plan = self.layer_plan()
        layers = gene.get("layers", [])
        if len(layers) != len(plan):
            raise ValueError(f"gene has {len(layers)} layers, the space has {len(plan)}")
        for slot, l in zip(plan, layers):
            if l["op"] not in self.layer_ops(slot, widths):
                raise ValueError(f"layer {slot.index}: operator {l['op']!r} not allowed here "
                                 f"(allowed: {self.layer_ops(slot, widths)})")
            if l["k"] not in self.kernels:
                raise ValueError(f"layer {slot.index}: kernel {l['k']} not among {self.kernels}")
        return self.gene(widths, layers)

    def mutate(self, gene: dict, rng: random.Random, prob: float = 0.2) -> dict:
        """Each choice (stage width, layer op, layer kernel) is redrawn with probability `prob`."""
        widths = [rng.choice(s.widths) if rng.random() < prob else w for w, s in zip(gene["widths"], self.stages)]
        layers = []
        for slot, l in zip(self.layer_plan(), gene["layers"]):
            ops = self.layer_ops(slot, widths)
            op = rng.choice(ops) if (rng.random() < prob or l["op"] not in ops) else l["op"]
            k = rng.choice(self.kernels) if rng.random() < prob else l["k"]
            layers.append({"op": op, "k": k})
        return self.gene(widths, layers)

    def crossover(self, a: dict, b: dict, rng: random.Random) -> dict:
        """Uniform crossover of stage widths and layers."""
        widths = [x if rng.random() < 0.5 else y for x, y in zip(a["widths"], b["widths"])]
        layers = []
        for slot, la, lb in zip(self.layer_plan(), a["layers"], b["layers"]):
            l = dict(la if rng.random() < 0.5 else lb)
            if l["op"] not in self.layer_ops(slot, widths):
                l["op"] = rng.choice(self.layer_ops(slot, widths))
            layers.append(l)
        return self.gene(widths, layers)

    def size(self) -> int:
        """Number of distinct genes (an upper bound where skip availability varies)."""
        n = 1
        for s in self.stages:
            n *= len(s.widths)
        for _ in self.layer_plan():
            n *= len(self.ops) * len(self.kernels)
        return n

    # ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.stages]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        if not isinstance(d, dict):
            raise RunError(f"a search space is a mapping of its fields, got a {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        if set(d) - known or "name" not in d or "stages" not in d:
            raise RunError(f"search space fields: name and stages are required, the others optional "
                           f"({sorted(known)}); got {sorted(d)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str) -> "SearchSpace":
        """From a YAML or JSON file with the fields of this dataclass."""
        with open(path) as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError as e:
                raise ImportError("reading a YAML search space needs PyYAML (pip install pyyaml)") from e
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise RunError(f"{path}: not valid YAML ({e})") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise RunError(f"{path}: not valid JSON ({e}); a space file is .json, .yaml or .yml") from None
        try:
            return cls.from_dict(data)
        except RunError as e:
            raise RunError(f"{path}: {e}") from None


def _int_at_least(where: str, what: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise RunError(f"{where}: {what} must be an integer >= {lo}, got {v!r}")
    return v


def _int_list(where: str, what: str, v) -> tuple:
    if not isinstance(v, (list, tuple)) or not v:
        raise RunError(f"{where}: {what} must be a non-empty list of integers >= 1, got {v!r}")
    out = tuple(_int_at_least(where, what, x, 1) for x in v)
    if len(set(out)) != len(out):
        raise RunError(f"{where}: {what} has repeated values {list(out)}")
    return out


def gene_key(gene: dict) -> str:
    """A canonical string of a gene (for archives and de-duplication)."""
    return json.dumps({"widths": gene["widths"], "layers": gene["layers"]}, sort_keys=True)


def count_ops(gene: dict) -> dict:
    out = {}
    for l in gene["layers"]:
        out[l["op"]] = out.get(l["op"], 0) + 1
    return out


# --------------------------------------------------------------------------------------
# presets: each reproduces one seed paper's setting in miniature (digits-sized)
# --------------------------------------------------------------------------------------

PRESETS = {
    # the default: hybrid operators, evolutionary search over a weight-sharing supernet
    "digits": dict(name="digits", stages=[dict(depth=2, widths=(8, 16), stride=1),
                                          dict(depth=2, widths=(16, 32), stride=2),
                                          dict(depth=2, widths=(32, 48), stride=2)],
                   ops=("conv", "shift", "adder", "shiftadd", "skip"), kernels=(3, 5), stem=16),
    # ShiftNAS: shift-only operators (with skip), differentiable search
    "shiftnas": dict(name="shiftnas", stages=[dict(depth=2, widths=(16,), stride=1),
                                              dict(depth=2, widths=(32,), stride=2),
                                              dict(depth=2, widths=(48,), stride=2)],
                     ops=("shift", "skip"), kernels=(3, 5), stem=16),
    # ShiftAddNAS: hybrid conv / shift / adder, evolution, heterogeneous weight sharing
    "shiftaddnas": dict(name="shiftaddnas", stages=[dict(depth=2, widths=(8, 16), stride=1),
                                                    dict(depth=2, widths=(16, 32), stride=2),
                                                    dict(depth=2, widths=(32, 48), stride=2)],
                        ops=("conv", "shift", "adder"), kernels=(3, 5), stem=16),
    # ShiftAddAug: a tiny multiplication-free net (adder / shift only)
    "shiftaddaug": dict(name="shiftaddaug", stages=[dict(depth=1, widths=(8,), stride=1),
                                                    dict(depth=1, widths=(12,), stride=2),
                                                    dict(depth=1, widths=(16,), stride=2)],
                        ops=("shift", "adder"), kernels=(3,), stem=8),
}

STRATEGY_OF_PRESET = {"digits": "evo", "shiftnas": "darts", "shiftaddnas": "evo", "shiftaddaug": "evo"}
SHARE_OF_PRESET = {"digits": "hetero", "shiftnas": "naive", "shiftaddnas": "hetero", "shiftaddaug": "hetero"}


def get_space(name_or_path: str, in_channels: int = 1, num_classes: int = 10, image_size: int = 8) -> SearchSpace:
    """A preset by name, or a YAML/JSON file; the data's shape fills in the rest."""
    if name_or_path in PRESETS:
        sp = SearchSpace(**PRESETS[name_or_path])
    elif os.path.isfile(name_or_path):
        sp = SearchSpace.load(name_or_path)
    else:
        raise RunError(f"space {name_or_path!r}: neither a preset ({', '.join(PRESETS)}) nor a YAML/JSON file")
    sp.in_channels, sp.num_classes, sp.image_size = in_channels, num_classes, image_size
    return sp
