"""NAS driver: search space, supernet weight sharing, strategies, resume, augmentation, costs."""

import json
import math
import os
import random

import pytest
import torch

from shiftadd._cli import RunError
from shiftadd.nas.augment import AugNet
from shiftadd.nas.net import GeneNet
from shiftadd.nas.pipeline import GeneCosts, main as nas_main
from shiftadd.nas.search import Search, SearchConfig, TensorData, pareto_front
from shiftadd.nas.space import PRESETS, SearchSpace, gene_key, get_space
from shiftadd.nas.supernet import PiecewiseRemap, Supernet, laplace_kl
from shiftadd.nn import recalibrate_bn


@pytest.fixture(scope="module")
def space():
    return get_space("digits")


@pytest.fixture(scope="module")
def digits():
    from shiftadd.data import load_dataset
    from shiftadd.nas.pipeline import tensors

    s = load_dataset("digits")
    return s, tensors(s.train), tensors(s.val)


# --------------------------------------------------------------------------------------
# space
# --------------------------------------------------------------------------------------


def test_sampled_mutated_and_crossed_genes_are_valid(space):
    rng = random.Random(0)
    genes = [space.sample(rng) for _ in range(50)]
    for a, b in zip(genes, genes[1:]):
        space.validate(a)
        space.validate(space.mutate(a, rng, 0.5))
        space.validate(space.crossover(a, b, rng))
    assert len({gene_key(g) for g in genes}) > 40


def test_skip_only_where_shapes_agree(space):
    plan = space.layer_plan()
    widths = [16, 32, 48]
    for slot in plan:
        allowed = space.layer_ops(slot, widths)
        assert ("skip" in allowed) == (slot.stride == 1 and not (slot.first and slot.stage > 0)
                                       and (not slot.first or space.stem == widths[0]))
    bad = space.uniform("conv", widths=widths)
    bad["layers"][2]["op"] = "skip"  # first layer of stage 2: stride 2
    with pytest.raises(ValueError, match="not allowed"):
        space.validate(bad)


def test_validate_rejects_foreign_genes(space):
    g = space.uniform("adder")
    with pytest.raises(ValueError, match="width"):
        space.validate({**g, "widths": [7, 32, 48]})
    with pytest.raises(ValueError, match="layers"):
        space.validate({**g, "layers": g["layers"][:-1]})
    with pytest.raises(ValueError, match="kernel"):
        space.validate({**g, "layers": [{"op": "conv", "k": 7}] + g["layers"][1:]})


def test_space_file_round_trip(tmp_path, space):
    p = tmp_path / "space.json"
    p.write_text(json.dumps(space.to_dict()))
    assert SearchSpace.load(str(p)).to_dict() == space.to_dict()
    for name in PRESETS:
        get_space(name).sample(random.Random(0))


# --------------------------------------------------------------------------------------
# weight sharing
# --------------------------------------------------------------------------------------


def test_piecewise_remap_is_identity_then_monotone_and_continuous():
    r = PiecewiseRemap(bins=8)
    w = torch.linspace(-1.5, 2.5, 4001)
    torch.testing.assert_close(r(w, w), w, rtol=0, atol=1e-6)
    with torch.no_grad():
        r.log_scale_raw.copy_(torch.randn(8))
    y = r(w, w)
    assert bool((y[1:] >= y[:-1] - 1e-6).all()), "monotone"
    assert (y[1:] - y[:-1]).abs().max() < 0.05, "continuous at bin edges"
    assert abs(r(torch.zeros(1), w).item()) < 1e-6, "0 maps to 0"
    top = r(w.max().view(1), w)  # the maximum lies in the last bin (ShiftAddNAS dropped it)
    assert top.item() == pytest.approx(y.max().item())


def test_laplace_kl_is_smallest_when_the_remap_makes_weights_laplace_0_2():
    """Latent w ~ Laplace(0, 1) stretched by s: the KL (up to a constant) is minimal at s = 2."""
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((50000,))
    kl = {s: laplace_kl(w * s, torch.full_like(w, math.log(s))).item() for s in (0.5, 1.0, 2.0, 4.0, 8.0)}
    assert min(kl, key=kl.get) == 2.0, kl


@pytest.mark.parametrize("share", ["none", "naive", "hetero"])
def test_supernet_runs_every_sampled_subnet(space, share):
    torch.manual_seed(0)
    net = Supernet(space, share)
    rng = random.Random(1)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(3):
        g = space.sample(rng)
        out = net(x, g)
        assert out.shape == (4, 10)
        net.loss(out, y).backward()


def test_sharing_modes_share_what_they_say(space):
    none, naive, hetero = (Supernet(space, s) for s in ("none", "naive", "hetero"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(none) > count(hetero) > count(naive)
    layer = naive.layers[1]
    assert layer.view("conv", 8, 8, 3).data_ptr() == layer.view("adder", 8, 8, 3).data_ptr()
    h = hetero.layers[1]
    with torch.no_grad():
        h.remaps["adder"].log_scale_raw.fill_(0.5)
    s = math.exp(3 * math.tanh(0.5 / 3))  # the bounded log-scale
    torch.testing.assert_close(h.view("adder", 8, 8, 3), h.view("conv", 8, 8, 3) * s, rtol=1e-5, atol=1e-5)


def test_bn_recalibration_resets_statistics(space):
    net = Supernet(space, "naive")
    g = space.uniform("conv")
    x = torch.randn(32, 1, 8, 8) * 3 + 1
    recalibrate_bn(net, lambda b: net(b, g), [x])
    assert not net.training
    assert net.stem_bn.running_mean.abs().sum() > 0


# --------------------------------------------------------------------------------------
# stand-alone nets and costs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["conv", "shift", "adder", "shiftadd"])
def test_gene_net_builds_each_operator(space, op):
    net = GeneNet(space, space.uniform(op))
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_gene_net_shift_layers_are_the_supernets_deepshift_q_unless_told(space):
    from shiftadd.nn import ShiftConv2d

    gene = space.uniform("shiftadd")
    gene["layers"][0]["op"] = "shift"
    modes = {m.mode for m in GeneNet(space, gene).modules() if isinstance(m, ShiftConv2d)}
    assert modes == {"q"}
    modes = {m.mode for m in GeneNet(space, gene, mode="ps").modules() if isinstance(m, ShiftConv2d)}
    assert modes == {"ps"}


@pytest.mark.parametrize("mode,with_kwargs", [("q", True), ("ps", True), ("ps", False), ("q", False)])
def test_saved_gene_net_rebuilds_with_its_shift_mode(space, tmp_path, mode, with_kwargs):
    """A NAS model.pt loads with the layers it was saved with; files written before the
    layer kwargs were saved are recognised by their PS (sign / shift) tensors."""
    from shiftadd.nas.cost import _load_model_file

    gene = space.uniform("shift")
    gene["layers"][1]["op"] = "shiftadd"
    torch.manual_seed(0)
    net = GeneNet(space, gene, mode=mode).eval()
    meta = {"gene": gene, "space": space.to_dict()}
    if with_kwargs:
        meta["layer_kwargs"] = net.layer_kwargs
    torch.save({"state_dict": net.state_dict(), "meta": meta}, tmp_path / "model.pt")
    loaded = _load_model_file(str(tmp_path / "model.pt"))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_gene_costs_order_and_sum(space):
    costs = GeneCosts(space)
    e = {op: costs(space.uniform(op))["energy_uJ"] for op in ("conv", "shift", "adder", "shiftadd")}
    assert e["conv"] > e["adder"] > e["shift"], e
    c = costs(space.uniform("adder"))
    assert 0 < sum(c["layers_uJ"]) < c["energy_uJ"]  # the stem and classifier are the rest


def test_pareto_front():
    pts = [{"acc": 0.9, "energy_uJ": 2.0, "latency_ms": 1}, {"acc": 0.8, "energy_uJ": 1.0, "latency_ms": 1},
           {"acc": 0.7, "energy_uJ": 1.5, "latency_ms": 1}]
    front = pareto_front(pts)
    assert pts[2] not in front and len(front) == 2


# --------------------------------------------------------------------------------------
# strategies and resume
# --------------------------------------------------------------------------------------


def _search(space, digits, out, strategy, resume=False, log=lambda *_: None, **kw):
    _, (xt, yt), (xv, yv) = digits
    cfg = SearchConfig(strategy=strategy, share="hetero", seed=3, supernet_epochs=2, darts_epochs=6, darts_warmup=1,
                       population=6, parents=2, mutants=2, crossovers=2, generations=2, random_samples=5,
                       batch_size=128, **kw)
    s = Search(space, TensorData(xt[:384], yt[:384], xv[:128], yv[:128]), GeneCosts(space), cfg, str(out), log=log)
    return s.run(resume=resume)


@pytest.mark.parametrize("strategy", ["evo", "random", "darts"])
def test_each_strategy_returns_a_scored_valid_architecture(space, digits, tmp_path, strategy):
    res = _search(space, digits, tmp_path, strategy)
    space.validate(res["best"]["gene"])
    assert res["best"]["acc"] > 0.15  # a few epochs on digits already beat chance (0.1)
    assert res["best"]["energy_uJ"] == GeneCosts(space)(res["best"]["gene"])["energy_uJ"]
    if strategy != "darts":
        assert res["best"]["acc"] == max(a["acc"] for a in res["pareto"])


@pytest.mark.parametrize("strategy", ["evo", "random", "darts"])
def test_budget_is_respected(space, digits, tmp_path, strategy):
    costs = GeneCosts(space)
    budget = 0.3 * costs(space.uniform("conv"))["energy_uJ"]
    res = _search(space, digits, tmp_path, strategy, budget={"energy_uJ": budget})
    assert res["best"]["energy_uJ"] <= budget
    assert all(p["energy_uJ"] <= budget for p in res["pareto"])


def test_impossible_budget_fails_before_training(space, digits, tmp_path):
    with pytest.raises(RunError, match="meets the budget"):
        _search(space, digits, tmp_path, "evo", budget={"energy_uJ": 1e-6})
    assert not (tmp_path / "state.pt").exists()


@pytest.mark.parametrize("strategy,kill_at", [("evo", "generation 1/"), ("evo", "supernet epoch 1/"),
                                               ("darts", "darts epoch 2/")])
def test_search_killed_and_resumed_ends_the_same(space, digits, tmp_path, strategy, kill_at):
    straight = _search(space, digits, tmp_path / "a", strategy)

    class Killed(Exception):
        pass

    def killer(msg):
        if msg.startswith(kill_at):
            raise Killed

    with pytest.raises(Killed):
        _search(space, digits, tmp_path / "b", strategy, log=killer)
    resumed = _search(space, digits, tmp_path / "b", strategy, resume=True)
    assert resumed["best"]["gene"] == straight["best"]["gene"]
    assert resumed["best"]["acc"] == straight["best"]["acc"]


def test_resume_refuses_other_settings(space, digits, tmp_path):
    _search(space, digits, tmp_path, "random")
    with pytest.raises(ValueError, match="other settings"):
        _search(space, digits, tmp_path, "random", resume=True, mutate_prob=0.3)


# --------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------


def test_augmented_tiny_net_extracts_exactly(space):
    tiny_space = get_space("shiftaddaug")
    gene = tiny_space.uniform("adder")
    gene["layers"][1]["op"] = "shift"
    torch.manual_seed(0)
    aug = AugNet(tiny_space, gene)
    x = torch.randn(8, 1, 8, 8)
    aug.train()
    aug.forward_tiny(x).sum().backward()
    aug.forward_wide(x, 1).sum().backward()
    aug.eval()
    net = aug.extract().eval()
    torch.testing.assert_close(net(x), aug(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["digits", "shiftnas"])
def test_pipeline_quick_writes_the_report(tmp_path, preset):
    out = tmp_path / "main"
    nas_main("pipeline", ["--quick", "--space", preset, "--out", str(out), "--random", "2", "--epochs", "1"])
    report = (out / "report.md").read_text()
    results = json.loads((out / "retrain.json").read_text())
    names = [r["name"] for r in results]
    budget = float(report.split("Energy budget: ")[1].split(" uJ")[0])
    if preset == "digits":
        assert names[:4] == ["searched", "all-conv", "all-shift", "all-adder"]
    else:  # shift-only space: no all-conv or all-adder baselines
        assert names[:2] == ["searched", "all-shift"] and "all-conv" not in names
    assert sum(n.startswith("random") for n in names) == 2
    for r in results:
        if r["name"] == "searched" or r["name"].startswith("random"):
            assert r["energy_uJ"] <= budget * 1.001, r
    assert "WARNING" not in report
    assert (out / "pareto.png").stat().st_size > 1000
    assert os.path.exists(out / "search" / "best.json")


def test_pipeline_scores_each_candidate_by_its_mean_over_seeds(tmp_path):
    out = tmp_path / "main"
    nas_main("pipeline", ["--quick", "--out", str(out), "--random", "2", "--epochs", "1", "--seeds", "2"])
    results = json.loads((out / "retrain.json").read_text())
    for r in results:
        assert r["seeds"] == [0, 1] and len(r["test_accs"]) == 2
        assert r["test_acc"] == pytest.approx(sum(r["test_accs"]) / 2)
    report = (out / "report.md").read_text()
    assert "retrained 2 time(s)" in report and "standard error" in report


def test_verdict_difference_and_standard_error():
    from shiftadd.nas.pipeline import verdict

    res = [{"name": "searched", "test_acc": 0.98, "test_accs": [0.97, 0.98, 0.99]},
           {"name": "all-conv", "test_acc": 0.99},
           {"name": "random-1", "test_acc": 0.96}, {"name": "random-2", "test_acc": 0.98}]
    v = verdict(res)
    assert v["diff"] == pytest.approx(0.01) and v["beats"]
    # se = sqrt(0.01^2 / 3 + sd(0.96, 0.98)^2 / 2) = sqrt(1e-4 / 3 + 2e-4 / 2)
    assert v["se"] == pytest.approx((1e-4 / 3 + 2e-4 / 2) ** 0.5)
    assert v["z"] == pytest.approx(0.01 / v["se"])
    assert verdict(res[:2]) is None
    one_seed = [dict(res[0], test_accs=[0.98])] + res[1:]
    assert verdict(one_seed)["se"] is None and verdict(one_seed)["z"] is None  # a spread of one value is unknown
    tie = [dict(res[0], test_accs=[0.97, 0.97], test_acc=0.97), {"name": "random-1", "test_acc": 0.97},
           {"name": "random-2", "test_acc": 0.97}]
    assert verdict(tie)["z"] == 0.0 and not verdict(tie)["beats"]


def test_pipeline_rejects_a_seed_count_below_one(tmp_path, capsys):
    for arg, value in (("--seeds", "0"), ("--epochs", "0"), ("--epochs", "-1"), ("--random", "-1")):
        with pytest.raises(SystemExit) as e:
            nas_main("pipeline", ["--quick", "--out", str(tmp_path), arg, value])
        assert e.value.code == 2 and f"argument {arg}: must be >= " in capsys.readouterr().err


def test_pipeline_resume_retrains_results_of_other_epochs(tmp_path):
    out = tmp_path / "main"
    args = ["--quick", "--out", str(out), "--random", "0", "--epochs", "1"]
    nas_main("pipeline", args)
    assert {r["epochs"] for r in json.loads((out / "retrain.json").read_text())} == {1}
    nas_main("pipeline", args[:-1] + ["2", "--resume"])
    assert {r["epochs"] for r in json.loads((out / "retrain.json").read_text())} == {2}
    assert "for 2 epochs" in (out / "report.md").read_text()


def run_cli(argv, capsys):
    from shiftadd.cli import main as cli_main

    rc = cli_main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("text,match", [
    ("name: s\nstages: [{depth: 1, widths: [8]}]\nops: []", "ops must be a non-empty list"),
    ("name: s\nstages: [{depth: 1, widths: [8], stride: 2}]\nops: [skip]", "besides skip"),
    ("name: s\nstages: [{depth: 1, widths: [8]}]\nops: conv", "ops must be a non-empty list"),
    ("name: s\nstages: [{depth: 1, widths: [8]}]\nkernels: []", "kernels must be a non-empty list"),
    ("name: s\nstages: [{depth: 1, widths: [8]}]\nkernels: [0]", "kernels must be an integer >= 1"),
    ("name: s\nstages: [{depth: 1, widths: [8]}]\nkernels: [2, 4]", "kernels must be odd"),
    ("name: s\nstages: [{depth: 1, widths: [0]}]", "widths must be an integer >= 1"),
    ("name: s\nstages: [{depth: 1, widths: [8], stride: 0}]", "stride must be an integer >= 1"),
    ("name: s\nstages: [{depth: 0, widths: [8]}]", "depth must be an integer >= 1"),
    ("name: s\nstages: [{depth: 1, widths: [8]}]\nstem: 0", "stem must be an integer >= 1"),
    ("name: s\nstages: [{depth: 1, width: [8]}]", "must have depth, widths"),
    ("name: s\nstages: []", "stages must be a non-empty list"),
    ("stages: [{depth: 1, widths: [8]}]", "name and stages are required"),
    ("name: s\nstages: [{depth: 1, widths: [8]}]\nwidth: 3", "name and stages are required"),
    ("- name: s", "is a mapping of its fields"),
])
def test_space_files_with_bad_values_are_refused_clearly(tmp_path, text, match):
    pytest.importorskip("yaml")
    from shiftadd._cli import RunError

    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(RunError, match=match):
        SearchSpace.load(str(path))


def test_search_arguments_are_checked_before_any_work(tmp_path, capsys):
    base = ["search", "--out", str(tmp_path / "s"), "--epochs", "1"]
    for extra, match in ((["--budget", "energy_uJ=nan"], "finite numbers > 0"),
                         (["--budget", "energy_uJ=1,energy_uJ=2"], "energy_uJ twice"),
                         (["--space", "nosuch"], "neither a preset"),
                         (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "bogus"],
                          "--device")):
        rc, err = run_cli(base + extra, capsys)
        assert rc == 2 and match in err, (extra, err)
    for extra in (["--population", "0"], ["--generations", "-1"], ["--epochs", "0"]):
        with pytest.raises(SystemExit):
            run_cli(base + extra, capsys)
        assert "must be >= " in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_rank_asks_for_no_more_subnets_than_the_space_has(tmp_path, capsys):
    rc, err = run_cli(["rank", "--space", "shiftaddaug", "--subnets", "9", "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and "only 8 distinct subnets" in err
    with pytest.raises(SystemExit):
        run_cli(["rank", "--shares", "naive,foo"], capsys)
    assert "among none, naive, hetero" in capsys.readouterr().err


def test_retrain_takes_the_data_the_arch_was_searched_on(tmp_path, space):
    from shiftadd.nas.pipeline import run_retrain

    sp = get_space("digits", image_size=16)
    arch = tmp_path / "best.json"
    arch.write_text(json.dumps({"gene": sp.uniform("conv", widths=[8, 16, 32]), "space": sp.to_dict(),
                                "data": "digits", "upscale": 16}))
    import argparse

    a = argparse.Namespace(arch=str(arch), epochs=1, augment=False, out=str(tmp_path / "re"), data=None,
                           data_dir=None, upscale=None, seed=0, device="cpu")
    notes = []
    r = run_retrain(a, log=notes.append)
    want = GeneCosts(sp)(sp.uniform("conv", widths=[8, 16, 32]))["energy_uJ"]
    assert r["energy_uJ"] == pytest.approx(want) and not any(n.startswith("note") for n in notes)
    a.upscale = 8  # another size: allowed (a transfer), and said
    r8 = run_retrain(a, log=notes.append)
    assert r8["energy_uJ"] < want and any("searched on digits upscaled to 16" in n for n in notes)


def test_remap_gradients_are_bit_identical_from_call_to_call():
    """The remap's per-bin gradients are sums over many weights; indexing's backward added
    them with atomics on the CPU (different bits each run, so a seeded search picked
    different architectures in different processes)."""
    torch.manual_seed(0)
    r = PiecewiseRemap(bins=100)
    with torch.no_grad():
        r.log_scale_raw.uniform_(-1, 1)
    latent = torch.randn(48, 48, 5, 5)

    def grads():
        r.zero_grad(set_to_none=True)
        laplace_kl(r(latent, latent), r.log_slope(latent, latent)).backward()
        return r.log_scale_raw.grad.clone()

    first = grads()
    assert all(torch.equal(first, grads()) for _ in range(20))


def test_a_diverging_supernet_stops_with_a_clear_error(space, digits, tmp_path):
    _, (xt, yt), (xv, yv) = digits
    cfg = SearchConfig(strategy="random", share="hetero", supernet_epochs=1, lr=1e12, random_samples=1)
    s = Search(space, TensorData(xt[:256], yt[:256], xv[:64], yv[:64]), GeneCosts(space), cfg, str(tmp_path),
               log=lambda m: None)
    with pytest.raises(RuntimeError, match="diverged in epoch 1.*lower the learning rate"):
        s.run()
