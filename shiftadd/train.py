"""Training driver for the model zoo: recipes per variant, deterministic, resumable.

    shiftadd train --model resnet20 --variant adder --epochs 15 --out runs/r20-adder

or from Python::

    from shiftadd.models import build_model
    from shiftadd.data import load_dataset
    from shiftadd.train import train, recipe_for
    splits = load_dataset("digits")
    model = build_model("resnet20", "adder", splits.num_classes, splits.in_channels)
    hist = train(model, splits, epochs=15, batch_size=64, lr=0.1, recipe=recipe_for("adder"), out_dir="runs/x")

Recipes (:func:`recipe_for`; every field can be overridden):

* ``conv`` and ``adder`` — AdderNet's optimiser and schedule: SGD, momentum 0.9, weight
  decay 5e-4, cosine ``lr0 * 0.5 * (1 + cos(pi * epoch / E))`` stepped per epoch with
  lr0 = 0.1, which is exactly AdderNet's ``0.05 * (1 + cos(pi * epoch / E))``.  Adder
  layers keep their own adaptive gradient scaling (eta, inside the layer).  The default
  length differs from AdderNet's CIFAR run (400 epochs, batch 256): 200 epochs of batch
  128 on CIFAR, 15 of 64 on digits; pass --epochs 400 --batch-size 256 for theirs.
* ``shift`` (DeepShift-PS) and ``shiftadd`` (ShiftAddNet, whose shift half is PS): the
  ``shift`` P and ``sign`` S parameters get no weight decay; instead
  ``loss += weight_decay * sum(layer.shift_penalty())`` (0.5 * sum (2^P)^2, DeepShift) and
  a separate lr (``shift_lr``).  shift-PS defaults to Adam (lr 1e-3, shift_lr 1e-2),
  shiftadd to SGD (lr 0.1, shift_lr 0.01); :func:`recipe_for` says why (measured).
* everywhere: BatchNorm parameters and biases get no weight decay.

Determinism: every epoch starts by seeding torch / numpy / random and the loader's
generator from (seed, epoch, rank), ``torch.use_deterministic_algorithms(True,
warn_only=True)`` is on during training, and the checkpoint written (atomically: a temp
file in the same directory, then ``os.replace``) after every epoch holds the model,
optimizer, scheduler, GradScaler, RNG states (torch, CUDA, numpy, random, the loader's
generator) and the history.  ``resume=True`` continues from it, and on the CPU an
interrupted-and-resumed run ends bit-identical to an uninterrupted one (tested).

Mixed precision: ``amp=True`` runs the forward pass under ``torch.autocast`` — bfloat16 on
the CPU, float16 with a GradScaler on CUDA (the adder ops accumulate in float32 under
autocast; the shift penalty is computed in float32).

Multi-GPU: launched by ``torchrun --nproc_per_node K -m shiftadd.train ...`` (or
``shiftadd train``), WORLD_SIZE > 1 in the environment makes :func:`main` call
:func:`init_distributed` (NCCL on CUDA with device ``cuda:LOCAL_RANK``, Gloo on the CPU).
:func:`train` then wraps the model in DistributedDataParallel, shards the training set with
a DistributedSampler (``batch_size`` is per process), shards val / test disjointly and sums
the metrics across ranks; only rank 0 writes checkpoints, logs and results, and every
rank reads the checkpoint on resume.  BatchNorm statistics are per process (no SyncBN).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._cli import RunError, check_device, float_min, int_min, read_checkpoint, settings_diff
from .data import DATASETS, Splits, epoch_seed, load_dataset, make_loaders
from .models import MODELS, VARIANTS, build_model
from .nn import ShiftConv2d, ShiftLinear, renormalize_eta_grads

OPTIMIZERS = ("sgd", "adam", "radam")
CHECKPOINT = "checkpoint.pt"

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


# --------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """Optimisation settings.  ``shift_lr``: lr of the DeepShift-PS ``shift`` / ``sign``
    parameters (None: same as ``lr``); ``shift_penalty``: add ``weight_decay *
    sum(shift_penalty())`` to the loss (and never decay P and S directly)."""
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    shift_lr: Optional[float] = None
    shift_penalty: bool = True
    nesterov: bool = False
    epochs: int = 15
    batch_size: int = 64

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


# (epochs, batch size) per dataset: digits sized for about a minute of ResNet-20 (conv) on 2 CPU cores
_SIZES = {"digits": (15, 64), "cifar10": (200, 128), "cifar100": (200, 128)}


def recipe_for(variant: str, dataset: str = "digits", optimizer: Optional[str] = None, mode: str = "ps",
               **overrides) -> Recipe:
    """The default :class:`Recipe` of `variant` on `dataset`, with `overrides` applied.

    Optimizer defaults (chosen from runs on digits, ResNet-20, 15 epochs, seed 0): "sgd"
    for conv, adder, shiftadd and shift mode "q" (Q: 97.8% val with SGD, 96.9% with Adam);
    "adam" for shift mode "ps".

    * "sgd": momentum 0.9, lr 0.1 (AdderNet's 0.05 * (1 + cos)), weight decay 5e-4; PS
      ``shift`` / ``sign`` parameters get their own lower ``shift_lr`` 0.01 (DeepShift:
      PS from scratch needs a lower lr) and the shift penalty instead of weight decay.
      ShiftAddNet trained with SGD: shiftadd reaches 97% val on digits this way, against
      69% with Adam (whose lr 1e-3 barely moves the N(0, 1) adder weights).
    * "adam" / "radam": lr 1e-3 for the ordinary parameters without weight decay (Adam's
      L2 decay is not decoupled; the shift penalty stays, weighted by 5e-4) and
      ``shift_lr`` 1e-2 for P and S: an Adam step moves P by about lr, so at 1e-3 it takes
      hundreds of steps to cross one rounding boundary (79% val against 98% at 1e-2).
      DeepShift issue 8: Adam-family optimizers train PS where SGD stalls; here the all-PS
      ResNet-20 gets 98% val with Adam against 86% with SGD at shift_lr 0.01.  RAdam's
      warm-up makes it slower on short runs (89%).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    epochs, bs = _SIZES.get(dataset, _SIZES["cifar10"])
    ps = variant == "shiftadd" or (variant == "shift" and mode == "ps")
    opt = optimizer or ("adam" if variant == "shift" and mode == "ps" else "sgd")
    if opt not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {opt!r}")
    if opt == "sgd":
        r = Recipe("sgd", lr=0.1, weight_decay=5e-4, shift_lr=0.01 if ps else None, epochs=epochs, batch_size=bs)
    else:
        r = Recipe(opt, lr=1e-3, weight_decay=5e-4, shift_lr=1e-2 if ps else None, epochs=epochs, batch_size=bs)
    return dataclasses.replace(r, **overrides)


def _is_ps(m: nn.Module) -> bool:
    return isinstance(m, (ShiftConv2d, ShiftLinear)) and m.mode == "ps"


def shift_layers(model: nn.Module) -> list:
    """The DeepShift-PS layers of `model` (the ones with ``shift`` / ``sign`` parameters)."""
    return [m for m in model.modules() if _is_ps(m)]


def param_groups(model: nn.Module, recipe: Recipe) -> list:
    """Optimizer parameter groups: "decay" (weights, weight decay), "no_decay" (norm
    layers' parameters and biases, no weight decay), "shift" (PS ``shift`` and ``sign``,
    no weight decay, lr ``recipe.shift_lr``).  Each group has a "name" key."""
    shift_ids, no_decay_ids = set(), set()
    for m in model.modules():
        if _is_ps(m):
            shift_ids.update((id(m.shift), id(m.sign)))
        if isinstance(m, _NORM_TYPES):
            no_decay_ids.update(id(p) for p in m.parameters(recurse=False))
    groups = {"decay": [], "no_decay": [], "shift": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in shift_ids:
            groups["shift"].append(p)
        elif id(p) in no_decay_ids or name.endswith("bias") or p.dim() <= 1:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    wd = recipe.weight_decay if recipe.optimizer == "sgd" else 0.0
    out = [{"name": "decay", "params": groups["decay"], "weight_decay": wd},
           {"name": "no_decay", "params": groups["no_decay"], "weight_decay": 0.0}]
    if groups["shift"]:
        out.append({"name": "shift", "params": groups["shift"], "weight_decay": 0.0,
                    "lr": recipe.lr if recipe.shift_lr is None else recipe.shift_lr})
    return [g for g in out if g["params"]]


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = param_groups(model, recipe)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr)
    return torch.optim.RAdam(groups, lr=recipe.lr)


def cosine_factor(epoch: int, epochs: int) -> float:
    """0.5 * (1 + cos(pi * epoch / epochs)): the lr multiplier of `epoch` (0-based)."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def penalty(model: nn.Module) -> torch.Tensor:
    """sum of ``shift_penalty()`` (0.5 * sum (2^P)^2) over the PS layers, in float32."""
    terms = [m.shift_penalty().float() for m in shift_layers(model)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def compute_loss(model: nn.Module, out: torch.Tensor, y: torch.Tensor, recipe: Recipe) -> tuple:
    """(loss to minimise, cross-entropy): cross-entropy in float32, plus
    ``recipe.weight_decay * penalty(model)`` when ``recipe.shift_penalty`` and the model
    has PS layers (DeepShift's replacement for weight decay on P)."""
    ce = F.cross_entropy(out.float(), y)
    if recipe.shift_penalty and recipe.weight_decay and shift_layers(model):
        return ce + recipe.weight_decay * penalty(model).to(ce.device), ce
    return ce, ce


# --------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_distributed(device: str = "cpu") -> tuple:
    """When launched by torchrun (WORLD_SIZE > 1), init the default process group (NCCL for
    CUDA, Gloo for the CPU) and return (rank, world_size, device) with device
    ``cuda:LOCAL_RANK`` on CUDA; otherwise (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _all_sum(values: list, device) -> list:
    dist = _dist()
    if dist is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------
# train / evaluate
# --------------------------------------------------------------------------------------


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device="cpu", amp: bool = False) -> tuple:
    """(mean cross-entropy loss, accuracy in [0, 1]) of `model` over `loader` (summed over
    the ranks when distributed).  Leaves the model in eval mode."""
    device = torch.device(device)
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    loss_sum, correct, count = _all_sum([loss_sum, correct, count], device)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _rng_state(loaders) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "loader": loaders.generator.get_state()}


def _set_rng_state(state: dict, loaders) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    loaders.generator.set_state(state["loader"])


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    s = epoch_seed(seed, epoch, rank)
    torch.manual_seed(s)
    np.random.seed(s % (2 ** 32))
    random.seed(s)


def _atomic_write(path: str, write: Callable, mode: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=d)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, then os.replace: `path`
    holds either the previous complete file or the new one, never a partial write."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_json(obj, path: str) -> None:
    """json.dump with the same all-or-nothing guarantee as :func:`atomic_save`."""
    _atomic_write(path, lambda f: (json.dump(obj, f, indent=2), f.write("\n")), "w")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tqdm(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm


def train(model: nn.Module, splits: Splits, epochs: Optional[int] = None, batch_size: Optional[int] = None,
          lr: Optional[float] = None, recipe: Optional[Recipe] = None, out_dir: Optional[str] = None,
          resume: bool = False, seed: int = 0, amp: bool = False, device="cpu", progress: bool = True,
          num_workers: int = 0, meta: Optional[dict] = None,
          on_epoch_end: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train `model` on ``splits.train``, validating on ``splits.val`` every epoch, and
    test on ``splits.test`` at the end.

    recipe: optimisation settings (default :func:`recipe_for` ("conv") on ``splits.name``);
        `epochs`, `batch_size` and `lr` override its fields when given.
    out_dir: where ``checkpoint.pt`` (every epoch), ``history.json``, ``final.json`` and
        ``model.pt`` go (rank 0 only); None writes nothing.
    resume: continue from ``out_dir/checkpoint.pt`` when it exists.
    seed: the seed of everything random in training (not of the data split).
    amp: autocast (bfloat16 on the CPU, float16 + GradScaler on CUDA).
    meta: extra JSON-able facts stored in final.json and model.pt (e.g. how to rebuild).
    on_epoch_end(epoch, history): called after each epoch's checkpoint is written (an
        exception raised there stops training, as an interruption would).

    Returns the history: per-epoch lists "epoch", "train_loss", "train_acc", "val_loss",
    "val_acc", "lr", "seconds", plus "final" (the contents of final.json: test_acc,
    test_loss, val_acc, params, epochs, seconds, ...).  Accuracies are in [0, 1].
    """
    recipe = recipe or recipe_for("conv", splits.name)
    over = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    recipe = dataclasses.replace(recipe, **over)
    epochs = recipe.epochs
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")
    device = torch.device(device)
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    is_main = rank == 0
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if out_dir and is_main:
        os.makedirs(out_dir, exist_ok=True)

    cleanup = contextlib.ExitStack()
    cleanup.enter_context(deterministic_algorithms())
    try:
        model.to(device)
        net = model
        if dist is not None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        loaders = make_loaders(splits, recipe.batch_size, seed, num_workers=num_workers,
                               distributed=dist is not None, pin_memory=device.type == "cuda")
        optimizer = make_optimizer(model, recipe)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: cosine_factor(e, epochs))
        scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
        hist = {k: [] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")}
        start = 0
        run = {"seed": seed, "recipe": dataclasses.asdict(recipe), "meta": meta or {},
               "run": {"dataset": splits.name, "sizes": splits.sizes(), "amp": amp,
                       "world_size": dist.get_world_size() if dist else 1}}
        if not resume and is_main and ckpt_path and os.path.isfile(ckpt_path):
            print(f"note: {out_dir} holds a checkpoint of an earlier run; starting over (--resume continues it)",
                  file=sys.stderr)
        if resume and os.path.isfile(ckpt_path):
            ck = read_checkpoint(ckpt_path)
            if ck["epochs"] != epochs:
                raise RunError(f"{ckpt_path} is a run of {ck['epochs']} epochs; resume it with epochs={ck['epochs']}"
                               f" (got {epochs}) or use a new out_dir")
            diff = settings_diff({k: ck[k] for k in run if k in ck}, run)
            if diff:
                raise RunError(f"{ckpt_path} was trained with other settings than this run would continue with: "
                               f"{'; '.join(diff[:6])}; resume with the original arguments or use a new out_dir")
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            if ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            hist = ck["history"]
            start = ck["epoch"]
            if rank == ck.get("rank", 0):
                _set_rng_state(ck["rng"], loaders)
        bar_cls = _tqdm(progress and is_main)
        epoch_bar = bar_cls(total=epochs, initial=start, desc="epochs", unit="ep") if bar_cls else None
        t_total = sum(hist["seconds"])
        cleanup.callback(lambda: epoch_bar is not None and epoch_bar.close())
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            _seed_epoch(seed, epoch, rank)
            loaders.set_epoch(epoch)
            net.train()
            cur_lr = optimizer.param_groups[0]["lr"]
            loss_sum, correct, count = 0.0, 0.0, 0.0
            batches = loaders.train
            bbar = bar_cls(batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="batch") if bar_cls else None
            for x, y in (bbar if bbar is not None else batches):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device, amp):
                    out = net(x)
                total, loss = compute_loss(model, out, y, recipe)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if scaler.is_enabled():
                    # the adder layers' eta scaling ignores the loss scale: unscale, then restore it
                    scaler.unscale_(optimizer)
                    renormalize_eta_grads(model)
                scaler.step(optimizer)
                scaler.update()
                n = y.numel()
                loss_sum += loss.item() * n
                correct += (out.detach().argmax(1) == y).sum().item()
                count += n
                if bbar is not None:
                    bbar.set_postfix(loss=f"{loss.item():.3f}")
            if bbar is not None:
                bbar.close()
            scheduler.step()
            loss_sum, correct, count = _all_sum([loss_sum, correct, count], device)
            val_loss, val_acc = evaluate(model, loaders.val, device, amp)
            dt = time.perf_counter() - t0
            t_total += dt
            for k, v in (("epoch", epoch + 1), ("train_loss", loss_sum / max(count, 1)),
                         ("train_acc", correct / max(count, 1)), ("val_loss", val_loss), ("val_acc", val_acc),
                         ("lr", cur_lr), ("seconds", dt)):
                hist[k].append(v)
            if is_main and out_dir:
                atomic_save({"epoch": epoch + 1, "epochs": epochs, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                             "rng": _rng_state(loaders), "rank": rank, "history": hist, **run}, ckpt_path)
                atomic_json(hist, os.path.join(out_dir, "history.json"))
            if epoch_bar is not None:
                epoch_bar.update(1)
                epoch_bar.set_postfix(loss=f"{hist['train_loss'][-1]:.3f}", train=f"{hist['train_acc'][-1]:.3f}",
                                      val=f"{val_acc:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, hist)
        test_loss, test_acc = evaluate(model, loaders.test, device, amp)
        if hist["val_acc"]:
            val_acc = hist["val_acc"][-1]
        else:
            val_acc = evaluate(model, loaders.val, device, amp)[1]
        final = {"test_acc": test_acc, "test_loss": test_loss, "val_acc": val_acc, "params": count_params(model),
                 "epochs": epochs, "seconds": t_total,
                 "seconds_per_epoch": t_total / len(hist["seconds"]) if hist["seconds"] else None,
                 "dataset": splits.name, "sizes": splits.sizes(), "seed": seed, "amp": amp, "device": str(device),
                 "world_size": dist.get_world_size() if dist else 1, "recipe": dataclasses.asdict(recipe),
                 **(meta or {})}
        hist["final"] = final
        if is_main and out_dir:
            atomic_json(final, os.path.join(out_dir, "final.json"))
            atomic_save({"state_dict": model.state_dict(), "meta": meta or {}, "final": final},
                        os.path.join(out_dir, "model.pt"))
        return hist
    finally:
        cleanup.close()


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` inside the block (the
    deterministic CUDA scatter-add, for one), the previous setting restored after it."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def load_model(path: str, map_location="cpu") -> nn.Module:
    """Rebuild a zoo model saved by :func:`main` / :func:`train` (``model.pt`` or
    ``checkpoint.pt`` whose meta names the model, variant, width, layer kwargs, classes and
    channels) and load its weights.  Returns it in eval mode."""
    return model_from_saved(torch.load(path, map_location=map_location, weights_only=False), path)


def model_from_saved(obj, source: str) -> nn.Module:
    """:func:`load_model` of what torch.load read from `source` (named in errors)."""
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    state = obj.get("state_dict", obj.get("model")) if isinstance(obj, dict) else None
    if meta.get("model") not in MODELS or "variant" not in meta or state is None:
        raise ValueError(f"{source}: no zoo model description (meta with model, variant, ...) and weights; "
                         "it was not written by shiftadd train")
    model = build_model(meta["model"], meta["variant"], meta.get("num_classes", 10), meta.get("in_channels", 3),
                        meta.get("width", 1.0), **meta.get("layer_kwargs", {}))
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shiftadd train",
        description="Train a CIFAR ResNet / VGG-small in its conv, shift (DeepShift), adder (AdderNet) or "
                    "shiftadd (ShiftAddNet) variant on sklearn digits (default, no download) or a local CIFAR.",
        epilog="Recipes: conv/adder/shiftadd/shift-q: SGD momentum 0.9, lr 0.1, wd 5e-4, cosine (AdderNet); "
               "shift-ps: Adam lr 1e-3 with --shift-lr 1e-2 for the PS shift/sign parameters. PS parameters get the "
               "shift penalty instead of weight decay; with SGD their lr is 0.01. Multi-GPU: "
               "torchrun --nproc_per_node K -m shiftadd.train ... (batch size is per process).")
    a = p.add_argument
    a("--model", default="resnet20", choices=MODELS)
    a("--variant", default="conv", choices=VARIANTS)
    a("--data", default="digits", choices=DATASETS)
    a("--data-dir", default=None, help="local CIFAR directory (never downloaded)")
    a("--upscale", type=int_min(1), default=None, help="resize images to NxN (e.g. 32 for digits at CIFAR size)")
    a("--epochs", type=int_min(1), default=None, help="default: 15 on digits, 200 on CIFAR")
    a("--batch-size", type=int_min(1), default=None, help="default: 64 on digits, 128 on CIFAR (per process)")
    a("--lr", type=float_min(0, inclusive=False), default=None, help="default: 0.1 (sgd), 1e-3 (adam/radam)")
    a("--shift-lr", type=float_min(0, inclusive=False), default=None,
      help="lr of PS shift/sign parameters (default 0.01 sgd, 1e-2 adam)")
    a("--weight-decay", type=float_min(0), default=None, help="default 5e-4")
    a("--momentum", type=float_min(0), default=None, help="SGD momentum, default 0.9")
    a("--optimizer", default=None, choices=OPTIMIZERS, help="default adam for shift-ps, else sgd")
    a("--width", type=float_min(0, inclusive=False), default=1.0, help="channel width multiplier")
    a("--mode", default=None, choices=("ps", "q"), help="shift mode (default ps)")
    a("--weight-bits", type=int, choices=range(2, 9), metavar="{2..8}", default=None,
      help="shift weight bits (default 5)")
    a("--eta", type=float_min(0, inclusive=False), default=None, help="adder adaptive gradient scale (default 0.2)")
    a("--grad-mode", default=None, choices=("addernet", "exact"), help="adder gradient (default addernet)")
    a("--seed", type=int, default=0)
    a("--out", default=None, help="output directory (default runs/MODEL-VARIANT-DATA-sSEED)")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    a("--amp", action="store_true", help="autocast: bfloat16 on CPU, float16 + GradScaler on CUDA")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--num-workers", type=int_min(0), default=0)
    a("--threads", type=int_min(1), default=None,
      help="torch CPU threads (default 1 for 8x8 digits, whose tensors are too small for threads to pay, "
           "torch's default otherwise)")
    a("--no-progress", action="store_true", help="no tqdm bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prev_threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        elif args.data == "digits" and (args.upscale or 8) <= 16:
            torch.set_num_threads(1)
        return _main(args)
    except RunError as e:
        print(f"shiftadd train: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(prev_threads)


def _main(args) -> int:
    device = check_device("--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, device = init_distributed(device)
    layer_kw = {k: v for k, v in (("mode", args.mode), ("weight_bits", args.weight_bits), ("eta", args.eta),
                                  ("grad_mode", args.grad_mode)) if v is not None}
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                                   ("shift_lr", args.shift_lr), ("weight_decay", args.weight_decay),
                                   ("momentum", args.momentum)) if v is not None}
    out = args.out or os.path.join("runs", f"{args.model}-{args.variant}-{args.data}-s{args.seed}")
    try:
        try:
            splits = load_dataset(args.data, args.data_dir, args.upscale)
        except (FileNotFoundError, ImportError) as e:
            print(f"shiftadd train: {e}", file=sys.stderr)
            return 2
        recipe = recipe_for(args.variant, args.data, args.optimizer, args.mode or "ps", **overrides)
        torch.manual_seed(args.seed)  # model init (identical on every rank; DDP broadcasts rank 0's anyway)
        model = build_model(args.model, args.variant, splits.num_classes, splits.in_channels, args.width,
                            **layer_kw)
        meta = {"model": args.model, "variant": args.variant, "width": args.width, "layer_kwargs": layer_kw,
                "num_classes": splits.num_classes, "in_channels": splits.in_channels,
                "image_size": splits.image_size}
        hist = train(model, splits, recipe=recipe, out_dir=out, resume=args.resume, seed=args.seed, amp=args.amp,
                     device=device, progress=not args.no_progress, num_workers=args.num_workers, meta=meta)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        f = hist["final"]
        print(f"{args.model} {args.variant} on {args.data}: test acc {100 * f['test_acc']:.2f}%, val acc "
              f"{100 * f['val_acc']:.2f}%, {f['params']:,} params, {f['epochs']} epochs, {f['seconds']:.1f} s "
              f"-> {out}/final.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
