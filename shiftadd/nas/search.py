"""Search strategies over a weight-sharing supernet: ``evo``, ``darts`` and ``random``.

* ``evo`` (ShiftAddNAS, as in the SPOS-style evolution its code follows): the supernet is
  trained by uniform single-path sampling (each step one random subnet), then evolution
  searches it: 50 random feasible candidates first; each generation the top 10 of all
  candidates evaluated so far are the parents, and 25 mutants (each choice redrawn with
  probability 0.2) plus 25 crossovers form the next 50; 20 generations.  Constraints
  (energy, latency budgets) are applied by rejection; fitness is the search-validation
  accuracy of the subnet with inherited weights after BatchNorm recalibration; every
  feasible candidate enters a Pareto archive of (accuracy, energy, latency).
* ``darts`` (first-order DARTS on ShiftNAS's shift-only space): a softmax over each
  layer's candidate (operator, kernel) pairs mixes all of them; weights (SGD 0.025,
  cosine, momentum 0.9, wd 3e-4) and architecture logits (Adam 3e-4, betas (0.5, 0.999),
  wd 1e-3) are updated alternately on the two halves of the training split; the first
  epochs warm the weights up with uniform mixing; after them the softmax temperature is
  annealed from 10 to 0.02; a differentiable energy penalty (the expected energy of the
  mixture, over that of the most expensive choices) is added to the architecture loss.
  The result is each layer's most likely candidate; under a budget, layers are then moved
  to their next most likely cheaper candidate (largest energy saving first) until the net
  fits.  Differences from ShiftNAS: the network is a chain (no cell topology to search, so
  nothing to decouple), widths stay at their maximum, and the shared shift weights are
  DeepShift-Q (ShiftNAS's separate sign lr and no-decay rule concern PS parameters).
* ``random``: budget-feasible random subnets scored like ``evo``'s candidates (the
  baseline), after the same supernet training.

State is saved after every supernet epoch, every generation and every DARTS epoch
(``state.pt``, written atomically) with all random-number-generator states, so a
search resumed with ``resume=True`` ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._cli import RunError, read_checkpoint, settings_diff
from .space import SearchSpace, gene_key
from ..nn import recalibrate_bn
from .supernet import Supernet

STRATEGIES = ("evo", "darts", "random")


@dataclass
class SearchConfig:
    strategy: str = "evo"
    share: str = "hetero"
    seed: int = 0
    batch_size: int = 64
    # supernet training (evo, random)
    supernet_epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    recalib_batches: int = 4
    # evolution (ShiftAddNAS defaults)
    population: int = 50
    parents: int = 10
    mutants: int = 25
    crossovers: int = 25
    generations: int = 20
    mutate_prob: float = 0.2
    max_tries: int = 2000  # rejection sampling attempts per candidate batch
    # random search
    random_samples: int = 100
    # darts (DARTS / ShiftNAS defaults)
    darts_epochs: int = 30
    darts_warmup: int = 5
    darts_w_lr: float = 0.025
    darts_w_wd: float = 3e-4
    darts_a_lr: float = 3e-4
    darts_a_wd: float = 1e-3
    temp_start: float = 10.0
    temp_end: float = 0.02
    energy_penalty: float = 0.5
    # constraints: {"energy_uJ": x, "latency_ms": y}
    budget: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        unknown = set(self.budget) - {"energy_uJ", "latency_ms"}
        if unknown:
            raise ValueError(f"unknown budget keys {sorted(unknown)}; use energy_uJ and latency_ms")


# --------------------------------------------------------------------------------------
# data and scoring
# --------------------------------------------------------------------------------------


class TensorData:
    """Train / search-validation tensors, resident on the device; deterministic batches."""

    def __init__(self, x_train, y_train, x_val, y_val, device="cpu"):
        self.x, self.y = x_train.to(device), y_train.to(device)
        self.xv, self.yv = x_val.to(device), y_val.to(device)

    def batches(self, seed: int, batch_size: int, part: Optional[slice] = None):
        x, y = (self.x, self.y) if part is None else (self.x[part], self.y[part])
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g).to(x.device)
        for i in range(0, len(x) - batch_size + 1 if len(x) >= batch_size else 1, batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]

    def recalib(self, n: int, batch_size: int):
        return [b for b, _ in list(self.batches(12345, batch_size))[:n]]


@torch.no_grad()
def accuracy(forward: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (forward(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / max(1, len(x))


def score(net: Supernet, gene: dict, data: TensorData, cfg: SearchConfig) -> float:
    """Search-validation accuracy of a subnet with inherited weights, BN recalibrated."""
    recalibrate_bn(net, lambda b: net(b, gene), data.recalib(cfg.recalib_batches, cfg.batch_size))
    return accuracy(lambda b: net(b, gene), data.xv, data.yv)


# --------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------


def save_state(path: str, state: dict) -> None:
    from ..train import atomic_save

    atomic_save(state, path)


def load_state(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    return read_checkpoint(path)  # RunError naming the file when it cannot be read


def _rng_states(py_rng: random.Random) -> dict:
    return {"torch": torch.get_rng_state(), "py": py_rng.getstate()}


def _set_rng_states(s: dict, py_rng: random.Random) -> None:
    torch.set_rng_state(s["torch"])
    py_rng.setstate(s["py"])


# --------------------------------------------------------------------------------------
# the search
# --------------------------------------------------------------------------------------


class Search:
    """Runs one search in `out_dir`.

    costs(gene) -> {"energy_uJ": total, "latency_ms": total, "layers_uJ": [energy of each
    searchable layer]} (see :class:`shiftadd.nas.pipeline.GeneCosts`)."""

    def __init__(self, space: SearchSpace, data: TensorData, costs: Callable, cfg: SearchConfig, out_dir: str,
                 device="cpu", log: Callable = print):
        self.space, self.data, self.costs, self.cfg = space, data, costs, cfg
        self.out_dir, self.device, self.log = out_dir, torch.device(device), log
        os.makedirs(out_dir, exist_ok=True)
        self.state_path = os.path.join(out_dir, "state.pt")
        self.rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.net = Supernet(space, cfg.share).to(self.device)
        self.evaluated: dict = {}  # gene key -> val accuracy
        self.archive: list = []    # every feasible evaluated candidate
        self.phase, self.epoch, self.generation = "supernet", 0, 0
        self.population: list = []
        self.alphas = None
        self.history: list = []

    # ---- persistence --------------------------------------------------------------------

    def _snapshot(self) -> dict:
        return {"config": asdict(self.cfg), "space": self.space.to_dict(), "phase": self.phase, "epoch": self.epoch,
                "generation": self.generation, "net": self.net.state_dict(), "opt": self.opt.state_dict(),
                "rng": _rng_states(self.rng), "evaluated": self.evaluated, "archive": self.archive,
                "population": self.population, "alphas": self.alphas, "alpha_opt":
                self.alpha_opt.state_dict() if getattr(self, "alpha_opt", None) else None, "history": self.history}

    def save(self) -> None:
        save_state(self.state_path, self._snapshot())

    def resume(self) -> bool:
        s = load_state(self.state_path)
        if s is None:
            return False
        if s["config"] != asdict(self.cfg) or s["space"] != self.space.to_dict():
            diff = settings_diff({"config": s["config"], "space": s["space"]},
                                  {"config": asdict(self.cfg), "space": self.space.to_dict()})
            raise RunError(f"{self.state_path} belongs to a search with other settings ({'; '.join(diff[:6])}); "
                           "use a new --out or drop --resume")
        self.net.load_state_dict(s["net"])
        self._make_optimizers()
        self.opt.load_state_dict(s["opt"])
        self.phase, self.epoch, self.generation = s["phase"], s["epoch"], s["generation"]
        self.evaluated, self.archive, self.population = s["evaluated"], s["archive"], s["population"]
        self.history = s["history"]
        if s["alphas"] is not None:
            self.alphas = [a.to(self.device).requires_grad_() for a in s["alphas"]]
            self._make_alpha_optimizer()
            self.alpha_opt.load_state_dict(s["alpha_opt"])
        _set_rng_states(s["rng"], self.rng)
        self.log(f"resumed {self.state_path}: phase {self.phase}, epoch {self.epoch}, generation {self.generation}")
        return True

    # ---- helpers ------------------------------------------------------------------------

    def _make_optimizers(self):
        c = self.cfg
        if c.strategy == "darts":
            self.opt = torch.optim.SGD(self.net.parameters(), lr=c.darts_w_lr, momentum=0.9, weight_decay=c.darts_w_wd)
            self.total_epochs = c.darts_epochs
        else:
            self.opt = torch.optim.SGD(self.net.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
            self.total_epochs = c.supernet_epochs

    def _lr_at(self, epoch: int) -> float:
        from ..train import cosine_factor

        base = self.cfg.darts_w_lr if self.cfg.strategy == "darts" else self.cfg.lr
        return base * cosine_factor(epoch, self.total_epochs)

    def feasible(self, gene: dict) -> Optional[dict]:
        """The gene's costs when it meets the budget, else None."""
        c = self.costs(gene)
        for k, limit in self.cfg.budget.items():
            if c[k] > limit:
                return None
        return c

    def evaluate(self, gene: dict) -> float:
        k = gene_key(gene)
        if k not in self.evaluated:
            self.evaluated[k] = score(self.net, gene, self.data, self.cfg)
            c = self.costs(gene)
            self.archive.append({"gene": gene, "acc": self.evaluated[k], "energy_uJ": c["energy_uJ"],
                                 "latency_ms": c["latency_ms"]})
        return self.evaluated[k]

    def sample_feasible(self, n: int, make: Callable) -> list:
        out, tries = [], 0
        while len(out) < n and tries < self.cfg.max_tries:
            tries += 1
            g = make()
            if self.feasible(g) is not None and gene_key(g) not in {gene_key(x) for x in out}:
                out.append(g)
        return out

    # ---- phases -------------------------------------------------------------------------

    def train_supernet(self):
        """Uniform single-path training: one random subnet per step."""
        while self.epoch < self.total_epochs:
            for group in self.opt.param_groups:
                group["lr"] = self._lr_at(self.epoch)
            self.net.train()
            t0, total, total_ce, n = time.time(), 0.0, 0.0, 0
            for x, y in self.data.batches(self.cfg.seed * 1000 + self.epoch, self.cfg.batch_size):
                gene = self.space.sample(self.rng)
                logits = self.net(x, gene)
                loss = self.net.loss(logits, y)
                lv = self._finite(loss, gene)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                total, n = total + lv, n + 1
                total_ce += F.cross_entropy(logits.detach(), y).item()
            self._check_parameters()
            self.epoch += 1
            self.history.append({"phase": "supernet", "epoch": self.epoch, "loss": total / max(1, n),
                                 "ce": total_ce / max(1, n), "seconds": time.time() - t0})
            extra = f" (CE {total_ce / max(1, n):.3f} + KL term)" if self.cfg.share == "hetero" else ""
            self.log(f"supernet epoch {self.epoch}/{self.total_epochs} loss {total / max(1, n):.3f}{extra} "
                     f"({time.time() - t0:.1f} s)")
            self.save()
        self.phase = "evo" if self.cfg.strategy == "evo" else "random"
        self.save()

    def _finite(self, loss: torch.Tensor, gene: Optional[dict]) -> float:
        """loss.item(), or a clear error when the supernet's training diverged (a NaN latent
        weight would otherwise surface later as an out-of-range remap bin index)."""
        v = loss.item()
        if not math.isfinite(v):
            what = f" on subnet {[l['op'] + str(l['k']) for l in gene['layers']]}" if gene else ""
            raise self._diverged(f"{what}: the loss is {v}")
        return v

    def _check_parameters(self) -> None:
        """After an epoch: the last optimizer step may have made a weight non-finite."""
        bad = [n for n, p in self.net.named_parameters() if not torch.isfinite(p).all()]
        if self.alphas is not None and any(not torch.isfinite(a).all() for a in self.alphas):
            bad.append("architecture logits")
        if bad:
            raise self._diverged(f": {bad[:3]} became non-finite")

    def _diverged(self, what: str) -> RuntimeError:
        return RuntimeError(f"supernet training diverged in epoch {self.epoch + 1}{what}; lower the learning rate "
                            f"(lr {self._lr_at(self.epoch):.3g})")

    def _parents(self) -> list:
        """The best `parents` feasible candidates evaluated so far."""
        feasible = [a for a in self.archive if self._fits(a)]
        return [a["gene"] for a in sorted(feasible, key=lambda a: -a["acc"])[:self.cfg.parents]]

    def _fits(self, entry: dict) -> bool:
        return all(entry[k] <= v for k, v in self.cfg.budget.items())

    def evolve(self):
        c = self.cfg
        if not self.population:
            self.population = self.sample_feasible(c.population, lambda: self.space.sample(self.rng))
            if not self.population:
                raise RunError(f"no architecture of the space meets the budget {c.budget}")
        while self.generation < c.generations:
            t0 = time.time()
            for g in self.population:
                self.evaluate(g)
            parents = self._parents()
            mutants = self.sample_feasible(c.mutants, lambda: self.space.mutate(self.rng.choice(parents), self.rng,
                                                                                 c.mutate_prob))
            crosses = self.sample_feasible(c.crossovers, lambda: self.space.crossover(
                self.rng.choice(parents), self.rng.choice(parents), self.rng))
            self.population = mutants + crosses
            self.generation += 1
            best = self.evaluated[gene_key(parents[0])]
            self.history.append({"phase": "evo", "generation": self.generation, "best_acc": best,
                                 "seconds": time.time() - t0})
            self.log(f"generation {self.generation}/{c.generations}: best val acc {best:.4f}, "
                     f"{len(self.evaluated)} evaluated ({time.time() - t0:.1f} s)")
            self.save()
        for g in self.population:
            self.evaluate(g)
        self.phase = "done"
        self.save()

    def random_search(self):
        cands = self.sample_feasible(self.cfg.random_samples, lambda: self.space.sample(self.rng))
        for g in cands:
            self.evaluate(g)
        self.phase = "done"
        self.save()

    # ---- darts --------------------------------------------------------------------------

    def candidates(self, slot) -> list:
        widths = self.space.max_widths()
        out = []
        for op in self.space.layer_ops(slot, widths):
            for k in (self.space.kernels if op != "skip" else self.space.kernels[:1]):
                out.append((op, k))
        return out

    def _make_alpha_optimizer(self):
        c = self.cfg
        self.alpha_opt = torch.optim.Adam(self.alphas, lr=c.darts_a_lr, betas=(0.5, 0.999), weight_decay=c.darts_a_wd)

    def _temperature(self) -> float:
        """temp_start during warm-up, then annealed geometrically to temp_end at the last epoch."""
        c = self.cfg
        span = max(1, c.darts_epochs - 1 - c.darts_warmup)
        frac = min(1.0, max(0, self.epoch - c.darts_warmup) / span)
        return c.temp_start * (c.temp_end / c.temp_start) ** frac

    def _mixed_forward(self, x, probs):
        net, widths = self.net, self.space.max_widths()
        x = F.relu(net.stem_bn(net.stem(x)))
        for slot, layer, cands, p in zip(self.space.layer_plan(), net.layers, self.cand_lists, probs):
            c_out = widths[slot.stage]
            x = sum(p[i] * layer(x, op, k, c_out) for i, (op, k) in enumerate(cands))
        return F.linear(x.mean((2, 3)), net.fc.weight, net.fc.bias)

    def darts(self):
        c = self.cfg
        plan = self.space.layer_plan()
        self.cand_lists = [self.candidates(slot) for slot in plan]
        if self.alphas is None:
            self.alphas = [torch.zeros(len(cl), device=self.device, requires_grad=True) for cl in self.cand_lists]
            self._make_alpha_optimizer()
        # expected-energy table: every candidate's energy at every layer, over the most
        # expensive choice's total (so the penalty lies in [0, 1])
        e_table = [torch.tensor([self._layer_energy(i, op, k) for op, k in cl], device=self.device)
                   for i, cl in enumerate(self.cand_lists)]
        e_top = float(sum(e.max() for e in e_table)) or 1.0
        e_table = [e / e_top for e in e_table]
        half = len(self.data.x) // 2
        w_part, a_part = slice(0, half), slice(half, None)
        while self.epoch < c.darts_epochs:
            for group in self.opt.param_groups:
                group["lr"] = self._lr_at(self.epoch)
            temp = self._temperature()
            search_alpha = self.epoch >= c.darts_warmup
            self.net.train()
            t0, tot = time.time(), 0.0
            w_batches = self.data.batches(c.seed * 1000 + self.epoch, c.batch_size, w_part)
            a_batches = self.data.batches(c.seed * 1000 + self.epoch + 500, c.batch_size, a_part)
            for (xw, yw), (xa, ya) in zip(w_batches, a_batches):
                probs = [F.softmax(a.detach() / temp, 0) for a in self.alphas]
                loss = self.net.loss(self._mixed_forward(xw, probs), yw)
                lv = self._finite(loss, None)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                tot += lv
                if search_alpha:
                    probs = [F.softmax(a / temp, 0) for a in self.alphas]
                    energy = sum((p * e).sum() for p, e in zip(probs, e_table))
                    a_loss = F.cross_entropy(self._mixed_forward(xa, probs), ya) + c.energy_penalty * energy
                    self._finite(a_loss, None)
                    self.alpha_opt.zero_grad(set_to_none=True)
                    self.opt.zero_grad(set_to_none=True)
                    a_loss.backward()
                    self.alpha_opt.step()
            self._check_parameters()
            self.epoch += 1
            derived = self.derive()
            self.history.append({"phase": "darts", "epoch": self.epoch, "loss": tot, "temperature": temp,
                                 "gene": derived, "seconds": time.time() - t0})
            self.log(f"darts epoch {self.epoch}/{c.darts_epochs} T={temp:.3g} loss {tot:.2f} "
                     f"-> {[l['op'] + str(l['k']) for l in derived['layers']]} ({time.time() - t0:.1f} s)")
            self.save()
        self.evaluate(self.fit_budget(self.derive()))
        self.phase = "done"
        self.save()

    def _layer_energy(self, index: int, op: str, k: int) -> float:
        """Energy (uJ) of searchable layer `index` with (op, k) at the widest setting."""
        base_op = next(o for o in self.space.ops if o != "skip")
        gene = self.space.uniform(base_op, k=k, widths=self.space.max_widths())
        gene["layers"][index] = {"op": op, "k": k}
        return self.costs(gene)["layers_uJ"][index]

    def fit_budget(self, gene: dict) -> dict:
        """Moves layers to cheaper candidates, most likely first and largest saving first,
        until `gene` meets the budget (the DARTS result under a constraint)."""
        if self.feasible(gene) is not None:
            return gene
        probs = [F.softmax(a.detach(), 0) for a in self.alphas]
        gene = json.loads(json.dumps(gene))
        while self.feasible(gene) is None:
            cur = self.costs(gene)["layers_uJ"]
            best = None
            for i, (cl, p) in enumerate(zip(self.cand_lists, probs)):
                for j in p.argsort(descending=True).tolist():
                    op, k = cl[j]
                    e = self._layer_energy(i, op, k)
                    if e < cur[i] - 1e-12:
                        saving = cur[i] - e
                        if best is None or saving > best[0]:
                            best = (saving, i, op, k)
                        break
            if best is None:
                raise RuntimeError(f"no architecture derived from the DARTS logits meets the budget {self.cfg.budget}")
            _, i, op, k = best
            gene["layers"][i] = {"op": op, "k": k}
        self.log(f"derived architecture moved under the budget: {[l['op'] + str(l['k']) for l in gene['layers']]}")
        return gene

    def derive(self) -> dict:
        widths = self.space.max_widths()
        layers = []
        for cl, a in zip(self.cand_lists, self.alphas):
            op, k = cl[int(a.detach().argmax())]
            layers.append({"op": op, "k": k})
        return self.space.gene(widths, layers)

    # ---- driver -------------------------------------------------------------------------

    def check_budget(self) -> None:
        """Fails fast, before any training, when no sampled architecture meets the budget."""
        if not self.cfg.budget:
            return
        probe = random.Random(self.cfg.seed + 7)
        tries = [self.space.uniform(op, k) for op in self.space.ops for k in self.space.kernels]
        tries += [self.space.sample(probe) for _ in range(200)]
        if any(self.feasible(g) is not None for g in tries):  # stops at the first that fits
            return
        lowest = ", ".join(f"{k} {min(self.costs(g)[k] for g in tries):.4g}" for k in self.cfg.budget)
        raise RunError(f"no architecture of space {self.space.name!r} meets the budget {self.cfg.budget} "
                       f"(lowest found of each: {lowest})")

    def run(self, resume: bool = False) -> dict:
        from ..train import deterministic_algorithms

        with deterministic_algorithms():  # e.g. the remap's gather backward on CUDA
            return self._run(resume)

    def _run(self, resume: bool) -> dict:
        self._make_optimizers()
        self.check_budget()
        if not (resume and self.resume()):
            self.save()
        if self.cfg.strategy == "darts":
            if self.phase != "done":
                self.darts()
        else:
            if self.phase == "supernet":
                self.train_supernet()
            if self.phase == "evo":
                self.evolve()
            elif self.phase == "random":
                self.random_search()
        return self.result()

    def result(self) -> dict:
        feasible = [a for a in self.archive if self._fits(a)]
        if self.cfg.strategy == "darts":  # the derived architecture (moved under the budget)
            best = self.archive[-1] if self.archive and self._fits(self.archive[-1]) else None
        else:
            best = max(feasible, key=lambda a: a["acc"]) if feasible else None
        return {"best": best, "pareto": pareto_front(feasible), "evaluated": len(self.evaluated),
                "history": self.history}


def pareto_front(entries: list, keys=(("acc", 1), ("energy_uJ", -1), ("latency_ms", -1))) -> list:
    """The entries no other entry beats on every key (acc up, energy and latency down)."""
    def dominates(a, b):
        ge = all(a[k] * s >= b[k] * s for k, s in keys if k in a and k in b)
        gt = any(a[k] * s > b[k] * s for k, s in keys if k in a and k in b)
        return ge and gt

    return [e for e in entries if not any(dominates(o, e) for o in entries if o is not e)]
