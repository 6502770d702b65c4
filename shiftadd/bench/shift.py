"""Shift (power-of-two) operators versus the reference and the multiplication layer.

* quantizers (DeepShift Q and PS) on a weight tensor, per backend: ms and GB/s (bytes
  read plus written);
* the fused quantize-and-decode (``out_dtype``): a float32 weight quantized straight
  into bfloat16 (4 bytes read and 2 written per weight);
* a shift layer's training step (quantize + matmul/conv, forward and backward) against
  the same layer with a float weight (F.linear / F.conv2d): ``/ mult`` is the time ratio;
  in float32, and under bfloat16 autocast (float32 master weights; the shift layer's
  quantizer then writes the bfloat16 weight directly, the float layer is cast by autocast).
* packed-weight inference (``shift_linear_packed``, 4-bit codes) at small batches against
  the dense float32 F.linear with the decoded weight (bfloat16 on CUDA, as cuBLAS would
  run it): ms, GB/s of weight bytes read, and ``dense / this`` (> 1: faster than dense);
  on the CPU also the exact integer mode (``shift_linear_int``).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from .. import _dispatch, _ops
from .. import functional as SF
from .timing import environment, markdown_table, measure

CASES = {
    "cpu": {"weights": [(1024, 1024), (256, 256, 3, 3)],
            "layers": [("linear", (256, 1024), (1024, 1024)), ("conv", (32, 64, 16, 16), (64, 64, 3, 3))],
            "packed": [((8192, 8192), (1, 4, 16)), ((11008, 4096), (1, 16))]},
    "cuda": {"weights": [(8192, 8192), (4096, 11008), (256, 256, 3, 3)],
             "layers": [("linear", (4096, 4096), (4096, 4096)), ("conv", (128, 64, 32, 32), (64, 64, 3, 3))],
             "packed": [((8192, 8192), (1, 4, 16)), ((11008, 4096), (1, 4, 16))]},
}
QUICK = {"weights": [(256, 256)], "layers": [("linear", (64, 256), (256, 256)), ("conv", (8, 16, 16, 16), (16, 16, 3, 3))],
         "packed": [((512, 384), (1, 5))]}


def quantizer_rows(shape, device, min_time, include_reference=True):
    torch.manual_seed(0)
    w = torch.randn(shape, device=device)
    p, s = torch.rand(shape, device=device) * -10, torch.rand(shape, device=device) * 2 - 1
    rows = []
    n = w.numel()
    for family, args, nbytes, out in (("quantize_pot_q", (w, 5, None), 2 * n * 4, None),
                                      ("quantize_pot_ps", (p, s, 5, None), 3 * n * 4, None),
                                      ("quantize_pot_q", (w, 5, None), n * (4 + 2), torch.bfloat16),
                                      ("quantize_pot_ps", (p, s, 5, None), n * (8 + 2), torch.bfloat16)):
        for b in ("cuda", "triton", "cpu") + (("reference",) if include_reference else ()):
            if _dispatch.why_not(b, family, device, torch.float32) is not None or (b == "triton" and device.type == "cpu"):
                continue
            op = _ops.op(b, family)
            t = measure(lambda: op(*args, out), device, min_time=min_time)
            to = "" if out is None else " -> bf16"
            rows.append({"case": f"{family}{to} {tuple(shape)}", "pass": "forward", "impl": b, "ms": t * 1e3,
                         "GB/s": nbytes / t / 1e9})
    return rows


def layer_rows(kind, xs, ws, device, min_time, amp=None):
    """amp: None (float32) or the autocast dtype (float32 parameters and input)."""
    import contextlib

    def ctx():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def step(fn, inputs):
        with ctx():
            out = fn()
        return torch.autograd.grad(out, inputs, g.to(out.dtype))

    torch.manual_seed(0)
    x = torch.randn(xs, device=device, requires_grad=True)
    w = torch.randn(ws, device=device, requires_grad=True)
    p = (torch.rand(ws, device=device) * -10).requires_grad_()
    s = (torch.rand(ws, device=device) * 2 - 1).requires_grad_()
    layer = F.conv2d if kind == "conv" else F.linear
    pad = {"padding": 1} if kind == "conv" else {}
    shift = SF.shift_conv2d if kind == "conv" else SF.shift_linear
    g = torch.randn_like(layer(x, w, **pad))
    name = f"{kind} x{tuple(xs)} w{tuple(ws)}" + ("" if amp is None else f" {str(amp)[6:]} autocast")
    t_mult = measure(lambda: step(lambda: layer(x, w, **pad), (x, w)), device, min_time=min_time)
    rows = [{"case": name, "pass": "train step", "impl": f"mult ({kind})", "ms": t_mult * 1e3}]
    for mode, params in (("q", (w,)), ("ps", (p, s))):
        kw = {"mode": mode, **({"sign": s} if mode == "ps" else {})}
        t = measure(lambda: step(lambda: shift(x, params[0], **pad, **kw), (x, *params)), device, min_time=min_time)
        rows.append({"case": name, "pass": "train step", "impl": f"shift {mode} ({_dispatch.select('quantize_pot_q', w)})",
                     "ms": t * 1e3, "/ mult": t / t_mult})
    return rows


def packed_rows(shape, batches, device, min_time, include_reference=True):
    """Packed 4-bit PS weights (weight_bits 4) against the dense layer with the decoded weight."""
    from ..packed import pack_pot

    torch.manual_seed(0)
    o, k = shape
    p, s = torch.rand(shape, device=device) * -7, torch.rand(shape, device=device) * 2 - 1
    w = _ops.op("reference", "quantize_pot_ps")(p, s, 4, None)
    packed = pack_pot(w, 4)
    args = (packed.codes, packed.scales, packed.zero_codes, packed.bits, o, k)
    dense_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    wd = w.to(dense_dtype)
    rows = []
    for n in batches:
        x = torch.randn((n, k), device=device, dtype=dense_dtype)
        case = f"packed {o}x{k} 4-bit"
        t_dense = measure(lambda: F.linear(x, wd), device, min_time=min_time)
        rows.append({"case": case, "batch": n, "pass": "forward", "impl": f"dense F.linear {str(dense_dtype)[6:]}",
                     "ms": t_dense * 1e3, "GB/s": wd.numel() * wd.element_size() / t_dense / 1e9})
        for b in ("cuda", "triton", "cpu") + (("reference",) if include_reference else ()):
            if _dispatch.why_not(b, "shift_linear_packed", device, x.dtype) is not None:
                continue
            op = _ops.op(b, "shift_linear_packed")
            t = measure(lambda: op(x, *args, None), device, min_time=min_time)
            rows.append({"case": case, "batch": n, "pass": "forward", "impl": f"packed ({b})", "ms": t * 1e3,
                         "GB/s": packed.nbytes / t / 1e9, "dense / this": t_dense / t})
        if device.type == "cpu" and _dispatch.why_not("cpu", "shift_linear_int", device, torch.float32) is None:
            xi = torch.randint(-2 ** 15, 2 ** 15, (n, k), dtype=torch.int32)
            op = _ops.op("cpu", "shift_linear_int")
            t = measure(lambda: op(xi, *args), device, min_time=min_time)
            rows.append({"case": case, "batch": n, "pass": "forward", "impl": "integer shifts (cpu)",
                         "ms": t * 1e3, "GB/s": packed.nbytes / t / 1e9, "dense / this": t_dense / t})
    return rows


COLUMNS = ["case", "batch", "pass", "impl", "ms", "GB/s", "/ mult", "dense / this"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="shiftadd bench shift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--no-reference", action="store_true", help="skip the pure-PyTorch reference quantizers")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cases = QUICK if a.quick else CASES[device.type]
    min_time = 0.1 if a.quick else 0.3
    print(f"# shift operators, float32, {device.type}: {environment(device)}\n")
    rows = []
    for shape in cases["weights"]:
        rows += quantizer_rows(shape, device, min_time, include_reference=not a.no_reference)
    for amp in (None, torch.bfloat16):
        for kind, xs, ws in cases["layers"]:
            rows += layer_rows(kind, xs, ws, device, min_time, amp)
    for shape, batches in cases["packed"]:
        rows += packed_rows(shape, batches, device, min_time, include_reference=not a.no_reference)
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
