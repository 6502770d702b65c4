"""End-to-end: the fast kernels against the pure-PyTorch reference ops in real jobs.

* training: seconds per step (and per epoch: steps per epoch x the measured step time) of
  a ResNet-20 adder net (AdderNet recipe) at 32x32 (CIFAR-10 when --data-dir holds it,
  else digits upscaled), with ``auto`` and with the ``reference`` backend forced, against
  the same net built with nn.Conv2d (``/ conv net``; peak MB: CUDA memory of the steps
  above what the model and data held before them);
* inference: ms per batch of the ResNet-20 adder net in float32 and converted to exact
  int8 / 4-bit sums (quantize_adders_int8), against the nn.Conv2d net;
* search: wall time of the same small digits search (supernet training and evolution)
  under both, on the 8x8 images and on the images upscaled (``--search-upscale``, default
  32): at 8x8 every layer is a few microseconds of work and both backends time Python and
  launch overhead (0.97x measured on an H100, 2026-11-22); at 32x32 the layers' arithmetic
  is what CIFAR-sized inputs cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from .. import _dispatch, use_backend
from .timing import environment, markdown_table, measure


def train_steps(device, data_dir, steps: int, batch: int, backend: str, variant: str = "adder"):
    from ..data import load_dataset, make_loaders
    from ..models import build_model
    from ..train import make_optimizer, recipe_for

    if data_dir and os.path.isdir(data_dir):
        splits, name = load_dataset("cifar10", data_dir), "cifar10"
    else:
        splits, name = load_dataset("digits", upscale=32), "digits upscaled to 32x32"
    torch.manual_seed(0)
    model = build_model("resnet20", variant, splits.num_classes, splits.in_channels).to(device)
    opt = make_optimizer(model, recipe_for(variant, splits.name))
    loaders = make_loaders(splits, batch, 0)
    it = iter(loaders.train)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    with use_backend(backend):
        for i in range(steps + 1):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loaders.train)
                x, y = next(it)
            x, y = x.to(device), y.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first step warms up
                times.append(time.perf_counter() - t)
    step = sorted(times)[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20 if device.type == "cuda" else None
    return {"data": name, "step_s": step, "steps_per_epoch": len(loaders.train), "epoch_s": step * len(loaders.train),
            "peak_mb": peak}


def inference_times(device, data_dir, batch: int, reps: int = 10) -> dict:
    """Milliseconds per batch (median of `reps`) of ResNet-20 inference at 32x32: the adder
    net in float32 (``auto``), the same net after quantize_adders_int8 at 8 and 4 bits (one
    calibration batch; the weights are untrained, which does not change the time), and
    the nn.Conv2d net."""
    import copy

    from ..data import load_dataset, make_loaders
    from ..models import build_model
    from ..nn import quantize_adders_int8

    if data_dir and os.path.isdir(data_dir):
        splits = load_dataset("cifar10", data_dir)
    else:
        splits = load_dataset("digits", upscale=32)
    x = next(iter(make_loaders(splits, batch, 0).train))[0].to(device)
    torch.manual_seed(0)
    nets = {"adder float32": build_model("resnet20", "adder", splits.num_classes, splits.in_channels).to(device)}
    int8 = _dispatch.select_on("adder_linear_int8", torch.device(device), torch.float32)
    nets[f"adder int8 (exact sums, {int8})"] = quantize_adders_int8(copy.deepcopy(nets["adder float32"]), [x])
    nets["adder 4-bit (exact sums)"] = quantize_adders_int8(copy.deepcopy(nets["adder float32"]), [x], bits=4)
    nets["conv (nn.Conv2d) float32"] = build_model("resnet20", "conv", splits.num_classes, splits.in_channels).to(device)
    for net in nets.values():
        net.eval()
    with torch.no_grad():  # measure: one warm-up call, then the median of `reps`
        return {name: measure(lambda: net(x), device, reps=reps) * 1e3 for name, net in nets.items()}


def search_time(device, backend: str, upscale=None):
    from ..nas.pipeline import main as nas_main

    extra = ["--upscale", str(upscale)] if upscale else []
    with tempfile.TemporaryDirectory() as out, use_backend(backend):
        t = time.perf_counter()
        nas_main("search", ["--out", out, "--epochs", "3", "--generations", "3", "--population", "12",
                            "--device", str(device)] + extra)
        return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="shiftadd bench nas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default=None, help="a local CIFAR-10 (else digits upscaled)")
    p.add_argument("--steps", type=int, default=5, help="measured training steps per backend")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--search-upscale", type=int, default=32,
                   help="also time the search on the digits upscaled to this size (0: only at 8x8)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    print(f"# end to end, fast kernels versus reference ops, {device.type}: {environment(device)}\n")
    rows = []
    tr = {b: train_steps(device, a.data_dir, a.steps, a.batch, b) for b in ("auto", "reference")}
    conv = train_steps(device, a.data_dir, a.steps, a.batch, "auto", variant="conv")
    for b, r in tr.items():
        rows.append({"job": f"ResNet-20 adder train, batch {a.batch}, {r['data']}", "backend": b,
                     "s/step": r["step_s"], "s/epoch": r["epoch_s"],
                     "ref / this": tr["reference"]["step_s"] / r["step_s"], "/ conv net": r["step_s"] / conv["step_s"],
                     "peak MB": r["peak_mb"]})
    rows.append({"job": f"ResNet-20 conv (nn.Conv2d) train, batch {a.batch}, {conv['data']}", "backend": "-",
                 "s/step": conv["step_s"], "s/epoch": conv["epoch_s"], "peak MB": conv["peak_mb"]})
    inf = inference_times(device, a.data_dir, a.batch)
    conv_ms = inf["conv (nn.Conv2d) float32"]
    for name, ms in inf.items():
        rows.append({"job": f"ResNet-20 inference, batch {a.batch}, 32x32", "backend": name, "ms/batch": ms,
                     "/ conv net": ms / conv_ms})
    for size in [None] + ([a.search_upscale] if a.search_upscale else []):
        st = {b: search_time(device, b, size) for b in ("auto", "reference")}
        where = f"digits upscaled to {size}x{size}" if size else "digits 8x8"
        for b, t in st.items():
            rows.append({"job": f"search, {where} (3 supernet epochs, 3 generations of 12)", "backend": b,
                         "seconds": t, "ref / this": st["reference"] / t})
    print(markdown_table(rows, ["job", "backend", "s/step", "s/epoch", "ms/batch", "seconds", "ref / this",
                                "/ conv net", "peak MB"]))
    print(f"\ns/epoch = steps per epoch ({tr['auto']['steps_per_epoch']}) x the median of {a.steps} measured steps.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
