"""NAS cost models: energy (hand-counted MACs and energies) and the cached latency table."""

import json
import re

import pytest
import torch
from torch import nn

import shiftadd
from shiftadd.nas import cost
from shiftadd.nas.cost import (LatencyTable, LayerConfig, energy_table, layer_costs, main_energy,
                               main_profile_latency, model_energy, profile_latency)
from shiftadd.nn import AdderConv2d, AdderLinear, ShiftAddConv2d, ShiftConv2d, ShiftLinear

MULT, ADD, SHIFT = 3.7, 0.9, 0.13  # fp32 pJ (45 nm, Horowitz, ISSCC 2014)


def one(model, shape, **kw):
    costs = layer_costs(model, shape, **kw)
    assert len(costs) == 1, costs
    return costs[0]


# ---------------------------------------------------------------------------- energy

def test_constants_match_reference_and_carry_sources():
    expected = {("mult", "fp32"): 3.7, ("mult", "int32"): 3.1, ("mult", "int8"): 0.2,
                ("add", "fp32"): 0.9, ("add", "int32"): 0.1, ("add", "int8"): 0.03,
                ("shift", "fp32"): 0.13, ("shift", "int32"): 0.13, ("shift", "int8"): 0.024}
    assert {k: v for k, (v, _) in cost.ENERGY_PJ.items()} == expected
    for (unit, prec), (_, src) in cost.ENERGY_PJ.items():
        assert ("Horowitz" in src) if unit != "shift" else ("ShiftAddNet" in src), (unit, prec, src)


def test_conv_strided_grouped():
    # Ho = (9 + 2 - 3) // 2 + 1 = 5; MACs = 8 * 5 * 5 * (4 / 2) * 3 * 3
    m = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2))
    c = one(m, (4, 9, 9))
    assert (c.name, c.op, c.module) == ("0", "conv", "Conv2d")
    assert c.macs == 3600
    assert c.units == {"mult": 3600, "add": 3600}
    assert c.energy_pj == pytest.approx(3600 * (MULT + ADD))
    assert c.params == 8 * 2 * 9 + 8
    assert c.config == LayerConfig(4, 8, 3, 2, 9, 9, 1, 2)


def test_shift_conv_and_params_count_weight_once():
    m = nn.Sequential(ShiftConv2d(4, 4, 3, stride=1, padding=0, bias=False))  # 6x6 -> 4x4
    c = one(m, (4, 6, 6))
    assert c.op == "shift" and c.macs == 4 * 4 * 4 * 4 * 9 == 2304
    assert c.energy_pj == pytest.approx(2304 * (SHIFT + ADD))
    assert c.params == 4 * 4 * 9  # PS shift + sign tensors count as one weight
    assert c.config is None  # padding 0 with k=3 is not a latency-table geometry


def test_adder_conv_energy_is_two_adds_per_mac_every_precision():
    m = nn.Sequential(AdderConv2d(4, 6, 1, stride=2, groups=2))  # 8x8 -> 4x4; MACs = 6*16*2
    for prec, add in (("fp32", 0.9), ("int32", 0.1), ("int8", 0.03)):
        c = one(m, (4, 8, 8), precision=prec)
        assert c.macs == 192
        assert c.units == {"add": 384}
        assert c.energy_pj == pytest.approx(2 * add * 192)


def test_shiftadd_block_counts_both_parts():
    m = nn.Sequential(ShiftAddConv2d(4, 8, 3, stride=2, padding=1))
    costs = layer_costs(m, (4, 8, 8))
    assert [(c.name, c.op) for c in costs] == [("0.shift", "shift"), ("0.adder", "adder")]
    shift, adder = costs
    assert shift.macs == 8 * 4 * 4 * 4 * 9 == 4608  # 8x8 -> 4x4, stride 2
    assert adder.macs == 8 * 4 * 4 * 8 * 9 == 9216  # 8 -> 8 on 4x4, stride 1, same
    assert shift.energy_pj == pytest.approx(4608 * (SHIFT + ADD))
    assert adder.energy_pj == pytest.approx(9216 * 2 * ADD)
    assert shift.config == LayerConfig(4, 8, 3, 2, 8, 8) and adder.config == LayerConfig(8, 8, 3, 1, 4, 4)


def test_linear_layers_and_reuse_counts_twice():
    fc = nn.Linear(10, 3)
    m = nn.Sequential(AdderLinear(10, 5), ShiftLinear(5, 10), fc, nn.Identity(), nn.Linear(3, 10), fc)
    costs = layer_costs(m, (10,), precision="int32")
    assert [(c.name, c.op, c.macs, c.call) for c in costs] == [
        ("0", "adder", 50, 1), ("1", "shift", 50, 1), ("2", "linear", 30, 1), ("4", "linear", 30, 1),
        ("2", "linear", 30, 2)]
    e = [c.energy_pj for c in costs]
    assert e == pytest.approx([50 * 2 * 0.1, 50 * (0.13 + 0.1), 30 * (3.1 + 0.1), 30 * 3.2, 30 * 3.2])
    table = energy_table(costs)
    assert "2 (call 2)" in table
    # AdderLinear 50 (no bias) + ShiftLinear 50 + 10 + fc 30 + 3 (once) + Linear 30 + 10
    assert "parameters: 183" in table


def test_conventions_differ_as_specified():
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), AdderConv2d(4, 4, 3, padding=1), ShiftConv2d(4, 4, 1),
                      nn.Flatten(), nn.Linear(64, 2))
    paper = layer_costs(m, (2, 4, 4))
    code = layer_costs(m, (2, 4, 4), convention="shiftaddnas_code")
    assert [c.macs for c in paper] == [c.macs for c in code] == [4 * 16 * 2 * 9, 4 * 16 * 4 * 9, 4 * 16 * 4, 128]
    per_mac_paper = [c.energy_pj / c.macs for c in paper]
    per_mac_code = [c.energy_pj / c.macs for c in code]
    assert per_mac_paper == pytest.approx([MULT + ADD, 2 * ADD, SHIFT + ADD, MULT + ADD])
    assert per_mac_code == pytest.approx([MULT, ADD, SHIFT, MULT])
    assert code[1].energy_pj * 2 == pytest.approx(paper[1].energy_pj)
    assert code[2].units == {"shift": 256} and paper[2].units == {"shift": 256, "add": 256}
    with pytest.raises(ValueError, match="convention"):
        layer_costs(m, (2, 4, 4), convention="shiftaddnas")
    with pytest.raises(ValueError, match="precision"):
        layer_costs(m, (2, 4, 4), precision="fp16")


def test_model_energy_is_batch1_microjoules_and_batch_scales_macs():
    m = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2))
    assert model_energy(m, (4, 9, 9)) == pytest.approx(3600 * (MULT + ADD) * 1e-6)  # 0.01656 uJ
    assert layer_costs(m, (4, 9, 9), batch=3)[0].macs == 3 * 3600
    m.train()
    model_energy(m, (4, 9, 9))
    assert m.training  # mode restored


def _rows(table):
    """{first cell: cells} of the table's data rows (columns split on 2+ spaces)."""
    out = {}
    for line in table.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 4 and re.fullmatch(r"[\d.]+", cells[-1]) and re.fullmatch(r"[\d.]+", cells[-2]):
            out[cells[0]] = cells
    return out


def test_table_totals_equal_the_sum():
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      ShiftAddConv2d(4, 8, 3, stride=2, padding=1), AdderConv2d(8, 8, 3, padding=1),
                      nn.MaxPool2d(2), nn.Flatten(), AdderLinear(32, 10))
    costs = layer_costs(m, (1, 8, 8))
    assert [c.op for c in costs] == ["conv", "shift", "adder", "adder", "adder"]  # bn/relu/pool ignored
    table = energy_table(m, (1, 8, 8))
    rows = _rows(table)
    layer_rows = [v for k, v in rows.items() if k not in ("total",) and not k.startswith("subtotal")]
    assert len(layer_rows) == 5
    total = rows["total"]
    assert int(total[-3].replace(",", "")) == sum(c.macs for c in costs)
    assert float(total[-2]) == pytest.approx(model_energy(m, (1, 8, 8)), rel=1e-5)
    assert float(total[-2]) == pytest.approx(sum(float(r[-2]) for r in layer_rows), abs=5e-6)
    assert sum(float(r[-1]) for r in layer_rows) == pytest.approx(100, abs=0.03)
    assert float(rows["subtotal adder"][-2]) == pytest.approx(sum(c.energy_uj for c in costs if c.op == "adder"),
                                                              abs=1e-6)


def test_aux_layers_counted_only_on_request():
    m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))
    assert [c.op for c in layer_costs(m, (1, 4, 4))] == ["conv"]
    costs = layer_costs(m, (1, 4, 4), count_aux=True)
    assert [(c.op, c.macs) for c in costs] == [("conv", 32), ("bn", 32), ("act", 32), ("pool", 32), ("pool", 8)]
    assert costs[1].energy_pj == pytest.approx(32 * (MULT + ADD))
    assert costs[2].energy_pj == pytest.approx(32 * ADD)
    # the table's total MACs counts the MAC layers only
    assert _rows(energy_table(costs))["total"][-3] == "32"


def test_main_energy_builder_and_saved_model(tmp_path, capsys):
    seen = {}

    def builder(name, variant, num_classes, in_channels, width=None):
        seen.update(name=name, variant=variant, num_classes=num_classes, in_channels=in_channels, width=width)
        return nn.Sequential(AdderConv2d(in_channels, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, num_classes))

    args = ["--model", "tiny", "--variant", "adder", "--input", "1,8,8", "--classes", "10", "--precision", "int8",
            "--convention", "paper", "--json", str(tmp_path / "e.json")]
    assert main_energy(args, builder=builder) == 0
    assert seen == dict(name="tiny", variant="adder", num_classes=10, in_channels=1, width=None)
    out = capsys.readouterr().out
    assert "precision int8" in out and "total" in out
    data = json.loads((tmp_path / "e.json").read_text())
    expected = (4 * 64 * 9 * 2 * 0.03 + 2560 * (0.2 + 0.03)) * 1e-6
    assert data["total_uj"] == pytest.approx(expected)

    path = tmp_path / "m.pt"
    torch.save(builder("x", "adder", 10, 1), path)
    assert main_energy(["--model", str(path), "--input", "1,8,8"]) == 0
    assert _rows(capsys.readouterr().out)["total"][-3] == f"{4 * 64 * 9 + 2560:,}"


def test_energy_command_arch_file_and_saved_zoo_model(tmp_path, capsys):
    from shiftadd import train as T
    from shiftadd.cli import main as cli_main
    from shiftadd.nas.pipeline import GeneCosts
    from shiftadd.nas.space import get_space

    sp = get_space("digits")
    gene = sp.uniform("adder")
    arch = tmp_path / "best.json"
    arch.write_text(json.dumps({"gene": gene, "space": sp.to_dict()}))
    # options before the file, and --json, in the architecture mode
    assert cli_main(["energy", "--precision", "fp32", str(arch), "--json", str(tmp_path / "a.json")]) == 0
    assert "total" in capsys.readouterr().out
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["total_uj"] == pytest.approx(GeneCosts(sp)(gene)["energy_uJ"]) and data["input"] == [1, 8, 8]
    # a `shiftadd train` model.pt of digits: the input shape comes from the file
    out = tmp_path / "run"
    assert T.main(["--epochs", "1", "--batch-size", "256", "--width", "0.25", "--out", str(out),
                   "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["energy", "--model", str(out / "model.pt")]) == 0
    assert "input 1x8x8" in capsys.readouterr().out


# ---------------------------------------------------------------------------- latency

TINY = [LayerConfig(2, 2, 3, 1, 4, 4), LayerConfig(2, 4, 1, 2, 4, 4)]


@pytest.fixture
def counted(monkeypatch):
    """Counts the timed measurements (and keeps them short)."""
    calls = []
    real = cost._time_call

    def timed(fn, device, warmup, repeats):
        calls.append(device)
        return real(fn, device, 1, 2)

    monkeypatch.setattr(cost, "_time_call", timed)
    return calls


def test_profile_writes_cache_named_for_device_and_version_then_reuses_it(tmp_path, counted, monkeypatch):
    ops = ("conv", "adder", "shiftadd", "skip")
    t = profile_latency(ops, TINY, "cpu", cache_dir=tmp_path)
    assert len(counted) == t.measurements == 7  # skip only on the first config
    files = list(tmp_path.glob("*.json"))
    assert files == [cost.latency_cache_path("cpu", tmp_path)]
    assert files[0].name.endswith(f"-{shiftadd.__version__}.json")
    data = json.loads(files[0].read_text())
    assert data["device_key"] == cost.device_key("cpu") == t.device_key
    assert data["device_key"].startswith("cpu ") and f"({torch.get_num_threads()} threads)" in data["device_key"]
    assert data["version"] == shiftadd.__version__
    assert len(data["entries"]) == 7 and all(e["seconds"] > 0 for e in data["entries"])

    def no_timing(*a):
        raise AssertionError("re-measured a cached entry")

    monkeypatch.setattr(cost, "_time_call", no_timing)
    t2 = profile_latency(ops, TINY, "cpu", cache_dir=tmp_path)
    assert t2.measurements == 0
    for op, c in [("conv", TINY[0]), ("adder", TINY[1]), ("skip", TINY[0])]:
        assert t2.lookup(op, c) == t.lookup(op, c) == t.entries[(op, c)]
    assert t2.estimate([("conv", TINY[0]), ("shiftadd", TINY[1])]) == pytest.approx(
        t.entries[("conv", TINY[0])] + t.entries[("shiftadd", TINY[1])])


@pytest.mark.parametrize("field,value", [("device_key", "cpu Some Other CPU (64 threads)"), ("version", "0.0.1"),
                                         ("format", 0)])
def test_foreign_or_stale_cache_is_ignored(tmp_path, counted, field, value):
    profile_latency(("conv",), TINY, "cpu", cache_dir=tmp_path)
    path = cost.latency_cache_path("cpu", tmp_path)
    data = json.loads(path.read_text())
    data[field] = value
    data["entries"][0]["seconds"] = 123.0  # a value no measurement gives
    path.write_text(json.dumps(data))
    assert LatencyTable.load(path, "cpu") is None
    reason = {"device_key": "was measured on 'cpu Some Other CPU", "version": "is for shiftadd '0.0.1'",
              "format": "has format 0"}[field]
    assert reason in LatencyTable.check_file(path, "cpu")
    counted.clear()
    t = profile_latency(("conv",), TINY, "cpu", cache_dir=tmp_path)
    assert len(counted) == 2 and t.measurements == 2
    assert 123.0 not in t.entries.values()
    fresh = json.loads(path.read_text())  # replaced by this machine's table
    assert fresh["device_key"] == cost.device_key("cpu") and fresh["version"] == shiftadd.__version__


def test_missing_entry_measuring_disabled_raises_keyerror(tmp_path, counted):
    t = profile_latency(("conv",), TINY[:1], "cpu", cache_dir=tmp_path, measure=False)
    assert len(t) == 0 and not counted
    with pytest.raises(KeyError, match="no latency entry for op 'conv'.*measuring is disabled"):
        t.lookup("conv", TINY[0])
    profile_latency(("conv",), TINY[:1], "cpu", cache_dir=tmp_path)
    t = profile_latency(("conv",), TINY[:1], "cpu", cache_dir=tmp_path, measure=False)
    assert t.lookup("conv", (2, 2, 3, 1, 4, 4)) > 0  # tuple configs work too
    with pytest.raises(KeyError):
        t.lookup("adder", TINY[0])
    with pytest.raises(KeyError):
        t.estimate([("conv", TINY[0]), ("conv", TINY[1])])
    with pytest.raises(ValueError, match="identity"):
        t.lookup("skip", TINY[1])


def test_missing_entry_measured_on_demand_and_cached(tmp_path, counted):
    t = profile_latency(("conv",), TINY[:1], "cpu", cache_dir=tmp_path)
    assert len(counted) == 1
    v = t.lookup("shift", TINY[1])
    assert len(counted) == 2 and v > 0
    again = LatencyTable.load(cost.latency_cache_path("cpu", tmp_path), "cpu", measure=False)
    assert again.lookup("shift", TINY[1]) == v


def test_layer_costs_feed_the_latency_estimate(tmp_path, counted):
    m = nn.Sequential(ShiftAddConv2d(2, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(16, 2))
    convs = [c for c in layer_costs(m, (2, 4, 4)) if c.config is not None]
    assert [(c.op, c.config) for c in convs] == [("shift", LayerConfig(2, 4, 3, 2, 4, 4)),
                                                 ("adder", LayerConfig(4, 4, 3, 1, 2, 2))]
    t = LatencyTable("cpu", path=tmp_path / "t.json")
    assert t.estimate(convs) == pytest.approx(t.lookup("shift", convs[0].config) + t.lookup("adder", convs[1].config))
    with pytest.raises(ValueError, match="no LayerConfig"):
        t.estimate(layer_costs(m, (2, 4, 4)))


def test_cache_dir_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIFTADD_CACHE_DIR", str(tmp_path))
    p = cost.latency_cache_path("cpu")
    assert p.parent == tmp_path / "latency"
    assert p.name == f"{cost._slug(cost.device_key('cpu'))}-{shiftadd.__version__}.json"
    assert cost.latency_cache_path("cpu", tmp_path / "x").parent == tmp_path / "x"


def test_main_profile_latency_config_file(tmp_path, counted, capsys):
    cfg = tmp_path / "configs.json"
    cfg.write_text(json.dumps({"configs": [{"in_ch": 2, "out_ch": 2, "kernel": 3, "stride": 1, "h": 4, "w": 4},
                                           [2, 4, 1, 2, 4, 4]], "ops": ["conv", "skip"]}))
    assert main_profile_latency(["--configs", str(cfg), "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "2->2 k3 s1 @4x4 n1" in out and "2->4 k1 s2 @4x4 n1" in out and "3 entries measured" in out
    assert cost.latency_cache_path("cpu", tmp_path / "c").is_file()


def test_timer_takes_the_median(monkeypatch):
    """Each call of fn advances a fake clock by its planned duration: warm-up 5 and 7, then 1, 3, 2."""
    import shiftadd._timing as timing

    clock = [0.0]
    durations = iter([5.0, 7.0, 1.0, 3.0, 2.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += next(durations)

    assert cost._time_call(fn, torch.device("cpu"), warmup=2, repeats=3) == 2.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_table_key_names_the_gpu(tmp_path):
    t = profile_latency(("conv", "adder"), TINY[:1], "cuda", cache_dir=tmp_path, warmup=1, repeats=3)
    assert torch.cuda.get_device_name() in t.device_key and t.lookup("adder", TINY[0]) > 0
    assert cost.latency_cache_path("cuda", tmp_path) != cost.latency_cache_path("cpu", tmp_path)
