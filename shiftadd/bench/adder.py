"""Adder kernels versus the reference and today's implementations.

For each case and pass (forward, input gradient, exact weight gradient, a full training
step) it times every backend usable on the device, and for the forward the baselines:

* ``unfold``: the AdderNet implementation (im2col by F.unfold, then the |W - X| broadcast
  and a sum; this is what needs ~30 GB on a ResNet-50 stage-3 layer);
* ``cdist``: torch.cdist(p=1) on the same im2col matrix (the later AdderNet code);
* ``mult``: the multiplication layer of the same shape (F.conv2d / F.linear: oneDNN on
  the CPU, cuDNN/cuBLAS on the GPU, TF32 off so both sides are fp32).

Linear cases also time the quantized inference path (``adder_linear_int8``: int8 operands,
exact int32 sums; conv cases the whole ``AdderConv2dInt8`` layer on the float input), and
4-bit and 2-bit operands through thermometer codes and an int8
matrix product (:mod:`shiftadd.thermometer`), against the same float32 baselines.
Where the cuda backend has the fp16x2 forward, float16 rows time it beside the float16
forward with float32 sums, with the largest relative difference between the two; their
"/ mult" is against the float16 multiplication layer (cuBLAS / cuDNN tensor cores), their
"x unfold" and "x cdist" against the float32 baselines.

On CUDA, rows "cuda tiles ..., split-K ..., gin ..." time the forward, input gradient and
training step with kernel choices other than the defaults (SHIFTADD_CUDA_TILES=fit, forward
tiles fitted to the channels; SHIFTADD_CUDA_SPLIT_K=off, where auto splits the reduction of
layers with too few output tiles to fill the GPU; SHIFTADD_CUDA_GIN=sat, the AdderNet-mode
input gradient in two instructions per term; "classic" and "clamp" are the kernels before
them), with the largest difference to the default forward.

Columns: ms (median), G adder-MAC/s, x unfold and x cdist (their time over this row's:
speed-ups), / mult (this row's time over the multiplication layer's), peak MB (CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _dispatch, _ops, thermometer
from .timing import environment, markdown_table, measure, peak_memory


@dataclass
class Case:
    name: str
    x: tuple
    w: tuple
    stride: int = 1
    padding: int = 0

    @property
    def conv(self) -> bool:
        return len(self.x) == 4

    @property
    def family(self) -> str:
        return "adder_conv2d" if self.conv else "adder_linear"

    def out_hw(self):
        kh, kw = self.w[2:]
        h = (self.x[2] + 2 * self.padding - kh) // self.stride + 1
        w = (self.x[3] + 2 * self.padding - kw) // self.stride + 1
        return h, w

    @property
    def macs(self) -> int:
        if not self.conv:
            return self.x[0] * self.w[0] * self.x[1]
        h, w = self.out_hw()
        return self.x[0] * self.w[0] * h * w * self.w[1] * self.w[2] * self.w[3]

    def args(self):
        s, p = [self.stride] * 2, [self.padding] * 2
        return (s, p, [1, 1], 1) if self.conv else ()


CASES = {
    "cpu": [
        Case("linear 256x1024 @ 1024x1024", (256, 1024), (1024, 1024)),
        Case("resnet20 conv 32x16x32x32 -> 16, 3x3", (32, 16, 32, 32), (16, 16, 3, 3), 1, 1),
        Case("resnet20 conv 32x64x8x8 -> 64, 3x3", (32, 64, 8, 8), (64, 64, 3, 3), 1, 1),
        Case("resnet50 s3 conv 2x256x14x14 -> 256, 3x3", (2, 256, 14, 14), (256, 256, 3, 3), 1, 1),
    ],
    "cuda": [
        Case("linear 4096x1024 @ 4096x1024", (4096, 1024), (4096, 1024)),
        Case("resnet20 conv 128x16x32x32 -> 16, 3x3", (128, 16, 32, 32), (16, 16, 3, 3), 1, 1),
        Case("resnet20 conv 128x64x8x8 -> 64, 3x3", (128, 64, 8, 8), (64, 64, 3, 3), 1, 1),
        Case("resnet50 s3 conv 32x256x14x14 -> 256, 3x3", (32, 256, 14, 14), (256, 256, 3, 3), 1, 1),
    ],
}
QUICK = [
    Case("linear 64x256 @ 256x256", (64, 256), (256, 256)),
    Case("resnet20 conv 8x16x32x32 -> 16, 3x3", (8, 16, 32, 32), (16, 16, 3, 3), 1, 1),
]


# --------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------


def unfold_adder(case: Case, x, w):
    """AdderNet's implementation: unfold, then -sum |W_col - X_col| by broadcasting."""
    if not case.conv:
        return -(w.unsqueeze(2) - x.t().unsqueeze(0)).abs().sum(1).t()
    n = x.shape[0]
    ho, wo = case.out_hw()
    cols = F.unfold(x, case.w[2:], padding=case.padding, stride=case.stride)  # (N, K, L)
    cols = cols.permute(1, 2, 0).reshape(cols.shape[1], -1)  # (K, L*N)
    out = -(w.reshape(w.shape[0], -1, 1) - cols.unsqueeze(0)).abs().sum(1)  # (O, L*N)
    return out.view(w.shape[0], ho, wo, n).permute(3, 0, 1, 2)


def cdist_adder(case: Case, x, w):
    if not case.conv:
        return -torch.cdist(x, w, p=1)
    cols = F.unfold(x, case.w[2:], padding=case.padding, stride=case.stride).transpose(1, 2)  # (N, L, K)
    return -torch.cdist(cols.reshape(-1, cols.shape[2]), w.reshape(w.shape[0], -1), p=1)


def mult_layer(case: Case, x, w):
    return F.conv2d(x, w, None, case.stride, case.padding) if case.conv else F.linear(x, w)


def unfold_bytes(case: Case) -> int:
    if case.conv:
        h, w = case.out_hw()
        rows = case.x[0] * h * w
    else:
        rows = case.x[0]
    k = case.w[1] * (case.w[2] * case.w[3] if case.conv else 1)
    return 2 * rows * case.w[0] * k * 4  # the broadcast and its abs


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


def backends_for(family: str, device: torch.device, include_reference: bool):
    """Usable backends, without the Triton interpreter (a correctness tool, not a backend to time)."""
    names = [b for b in ("cuda", "triton", "cpu") if _dispatch.why_not(b, family, device, torch.float32) is None
             and not (b == "triton" and device.type == "cpu")]
    return names + (["reference"] if include_reference else [])


def run_case(case: Case, device: torch.device, include_reference: bool = True, min_time: float = 0.3) -> list:
    torch.manual_seed(0)
    x = torch.randn(case.x, device=device)
    w = torch.randn(case.w, device=device)
    args = case.args()
    y_shape = _ops.op("reference", case.family)(x[:1], w, *args, "addernet").shape[1:]
    g = torch.randn((case.x[0], *y_shape), device=device)
    rows = []

    def add(pass_, impl, fn):
        t = measure(fn, device, min_time=min_time)
        row = {"case": case.name, "pass": pass_, "impl": impl, "ms": t * 1e3, "G adder-MAC/s": case.macs / t / 1e9,
               "peak MB": None}
        mem = peak_memory(fn, device)
        if mem is not None:
            row["peak MB"] = mem / 2**20
        rows.append(row)
        return t

    base = {}
    need = unfold_bytes(case)
    if need < 0.5 * available_bytes(device):
        base["unfold"] = add("forward", "unfold (AdderNet)", lambda: unfold_adder(case, x, w))
    else:
        rows.append({"case": case.name, "pass": "forward", "impl": "unfold (AdderNet)",
                     "note": f"skipped: needs {need / 2**30:.1f} GB"})
    base["cdist"] = add("forward", "torch.cdist p=1", lambda: cdist_adder(case, x, w))
    base["mult"] = add("forward", "mult (" + ("conv2d" if case.conv else "linear") + ")", lambda: mult_layer(case, x, w))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    base["mult step"] = add("train step", "mult (" + ("conv2d" if case.conv else "linear") + ")",
                            lambda: torch.autograd.grad(mult_layer(case, xg, wg), (xg, wg), g))

    for b in backends_for(case.family, device, include_reference):
        op = _ops.op(b, case.family)
        t = add("forward", b, lambda: op(x, w, *args, "addernet"))
        rows[-1].update(_ratios(t, base, "mult"))
        add("grad input (addernet)", b, lambda: _ops.op(b, case.family + "_grad_input")(g, x, w, *args, "addernet"))
        add("grad weight (exact)", b, lambda: _ops.op(b, case.family + "_grad_weight")(g, x, w, *args, "exact"))
        t = add("train step", b, lambda: torch.autograd.grad(op(xg, wg, *args, "addernet"), (xg, wg), g))
        rows[-1]["/ mult"] = t / base["mult step"]
    if "cuda" in backends_for(case.family, device, False):  # kernel choices other than the default
        op = _ops.op("cuda", case.family)
        for tiles, splits, gin in (("classic", "off", "clamp"), ("fit", "auto", "sat"), ("classic", "off", "sat"),
                                   ("fit", "auto", "clamp")):
            impl = f"cuda tiles {tiles}, split-K {splits}, gin {gin}"
            try:  # a failure is a row, not the end of the table
                with _env("SHIFTADD_CUDA_TILES", tiles), _env("SHIFTADD_CUDA_SPLIT_K", splits), \
                        _env("SHIFTADD_CUDA_GIN", gin):
                    t = add("forward", impl, lambda: op(x, w, *args, "addernet"))
                    rows[-1].update(_ratios(t, base, "mult"))
                    add("grad input (addernet)", impl,
                        lambda: _ops.op("cuda", case.family + "_grad_input")(g, x, w, *args, "addernet"))
                    t = add("train step", impl, lambda: torch.autograd.grad(op(xg, wg, *args, "addernet"),
                                                                            (xg, wg), g))
                    rows[-1]["/ mult"] = t / base["mult step"]
                    y_new = op(x, w, *args, "addernet").double()
                d = (y_new - op(x, w, *args, "addernet").double()).abs().max()
                rows[-1]["note"] = f"forward: max abs. diff to the default choice {d:.1e}"
            except RuntimeError as e:
                rows.append({"case": case.name, "pass": "forward", "impl": impl,
                             "note": f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}"})
    fam16 = case.family + "_fp16x2"
    if _dispatch.why_not("cuda", fam16, device, torch.float16) is None:  # float16 forwards: float32 and fp16x2 sums
        x16, w16 = x.half(), w.half()
        f32, f16 = _ops.op("cuda", case.family), _ops.op("cuda", fam16)
        base["mult16"] = add("forward float16", "mult (" + ("conv2d" if case.conv else "linear") + ") float16",
                             lambda: mult_layer(case, x16, w16))
        t = add("forward float16", "cuda (float32 sums)", lambda: f32(x16, w16, *args, "addernet"))
        rows[-1].update(_ratios(t, base, "mult16"))
        t = add("forward float16", "cuda fp16x2", lambda: f16(x16, w16, *args, "addernet"))
        rows[-1].update(_ratios(t, base, "mult16"))
        a, b = f16(x16, w16, *args, "addernet").double(), f32(x16, w16, *args, "addernet").double()
        rows[-1]["note"] = f"max rel. diff to the float32 sums {((a - b).abs() / b.abs().clamp_min(1e-30)).max():.1e}"
    if case.conv:  # the quantized inference layer: quantize, int8 im2col, exact int32 sums, dequantize
        from ..nn import AdderConv2dInt8

        wq = torch.randint(-128, 128, case.w, dtype=torch.int8, device=device)
        layer = AdderConv2dInt8(wq, float(x.abs().max()) / 127, None, case.stride, case.padding)
        # its sums: the op auto picks, and the compiled kernel of the device forced where auto
        # does not take it (a kernel waiting in GPU_NOT_YET_RUN)
        sel = _dispatch.select_on("adder_linear_int8", device, torch.float32)  # (integer ops: their float twin)
        kern = "cuda" if device.type == "cuda" else "cpu"
        for name in [sel] + ([kern] if kern != sel and kern in backends_for("adder_linear_int8", device, False)
                             else []):
            with torch.no_grad(), _dispatch.use_backend(name):
                t = add("forward int8 (exact)", f"AdderConv2dInt8 ({name}{' = auto' if name == sel else ''})",
                        lambda: layer(x))
            rows[-1].update(_ratios(t, base, "mult"))
    else:  # the quantized inference path: int8 operands, exact int32 sums
        xq = torch.randint(-128, 128, case.x, dtype=torch.int8, device=device)
        wq = torch.randint(-128, 128, case.w, dtype=torch.int8, device=device)
        for b in backends_for("adder_linear_int8", device, include_reference):
            op8 = _ops.op(b, "adder_linear_int8")
            t = add("forward int8 (exact)", b, lambda: op8(xq, wq))
            rows[-1].update(_ratios(t, base, "mult"))
        for bits in (4, 2):  # low-bit operands: thermometer codes, one int8 product (the layer's codes are kept)
            lo, hi = thermometer.value_range(bits)
            xb = torch.randint(lo, hi + 1, case.x, dtype=torch.int8, device=device)
            codes = thermometer.weight_codes(torch.randint(lo, hi + 1, case.w, dtype=torch.int8, device=device), bits)
            t = add(f"forward int{bits} (exact)", "thermometer (torch._int_mm)",
                    lambda: thermometer.adder_linear_codes(xb, codes, bits, case.w[0]))
            rows[-1].update(_ratios(t, base, "mult"))
    return rows


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _ratios(t: float, base: dict, mult_key: str) -> dict:
    out = {}
    if "unfold" in base:
        out["x unfold"] = base["unfold"] / t
    out["x cdist"] = base["cdist"] / t
    out["/ mult"] = t / base[mult_key]
    return out


COLUMNS = ["case", "pass", "impl", "ms", "G adder-MAC/s", "x unfold", "x cdist", "/ mult", "peak MB", "note"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="shiftadd bench adder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--no-reference", action="store_true", help="skip the pure-PyTorch reference backend")
    p.add_argument("--only", default=None, help="run only the cases whose name contains this text (e.g. linear)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cases = [c for c in (QUICK if a.quick else CASES[device.type]) if a.only is None or a.only in c.name]
    if not cases:
        p.error(f"--only {a.only!r} matches no case")
    print(f"# adder kernels, float32 (float16 and int8 where a row says so), {device.type}: {environment(device)}\n")
    rows = []
    for case in cases:
        print(f"  running {case.name} ...", file=sys.stderr, flush=True)
        rows += run_case(case, device, include_reference=not a.no_reference, min_time=0.1 if a.quick else 0.3)
    print(markdown_table(rows, COLUMNS))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"environment": environment(device), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
