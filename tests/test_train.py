"""Data splits, loaders and the training driver: recipes, checkpoints, resume, CLI."""

import json
import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from shiftadd import data as D
from shiftadd import train as T
from shiftadd.models import build_model
from shiftadd.nn import ShiftConv2d, ShiftLinear

pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 8x8 images: threads only add overhead (and the cores are shared)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    return D.load_dataset("digits")


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


def _tensors(ds):
    return ds.tensors


def test_digits_split_fixed_stratified_normalised(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    y_all = raw.target
    n = len(y_all)
    tr, va, te = D.stratified_split(y_all)
    assert len(tr) + len(va) + len(te) == n == 1797
    assert len(set(tr) | set(va) | set(te)) == n  # disjoint and covering
    assert abs(len(tr) / n - 0.6) < 0.01 and abs(len(va) / n - 0.2) < 0.01
    overall = np.bincount(y_all, minlength=10) / n
    for idx in (tr, va, te):  # stratified: every class count within one image of its share
        counts = np.bincount(y_all[idx], minlength=10)
        assert np.abs(counts - overall * len(idx)).max() <= 1
    # identical on every call, whatever the global seeds
    torch.manual_seed(123)
    np.random.seed(7)
    again = D.load_dataset("digits")
    for a, b in ((digits.train, again.train), (digits.val, again.val), (digits.test, again.test)):
        assert all(torch.equal(u, v) for u, v in zip(_tensors(a), _tensors(b)))
    xtr, ytr = _tensors(digits.train)
    assert xtr.shape == (len(tr), 1, 8, 8) and xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert torch.equal(ytr, torch.from_numpy(y_all[tr]))
    # normalised with the train split's statistics, applied to val and test too
    assert abs(xtr.mean().item()) < 1e-5 and abs(xtr.std().item() - 1) < 1e-5
    x01 = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16
    mean, std = x01[tr].mean().item(), x01[tr].std().item()
    assert digits.mean == pytest.approx((mean,)) and digits.std == pytest.approx((std,))
    xte, _ = _tensors(digits.test)
    torch.testing.assert_close(xte, (x01[te] - mean) / std)
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)


def test_digits_upscale():
    s = D.load_dataset("digits", upscale=32)
    x, _ = _tensors(s.train)
    assert x.shape[1:] == (1, 32, 32) and s.image_size == 32
    assert abs(x.mean().item()) < 1e-5


def test_missing_cifar_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.load_dataset("cifar10", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "cifar-10-batches-py" in msg and "never downloads" in msg
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        D.load_dataset("cifar100")
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("mnist")
    assert T.main(["--data", "cifar10", "--data-dir", str(tmp_path), "--no-progress", "--out",
                   str(tmp_path / "r")]) == 2


def _fake_cifar10(root, per_batch=240):
    d = root / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(per_batch)]
        entry = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": labels}
        with open(d / name, "wb") as f:
            pickle.dump(entry, f)


def test_cifar_reader_split_and_augmentation(tmp_path):
    _fake_cifar10(tmp_path)
    s = D.load_cifar_splits("cifar10", tmp_path, val_size=200)
    assert (len(s.train), len(s.val), len(s.test)) == (1000, 200, 240)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 3, 32)
    assert np.bincount(s.val.labels.numpy(), minlength=10).tolist() == [20] * 10  # stratified
    x, y = s.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.manual_seed(0)
    a = torch.stack([s.train[3][0] for _ in range(8)])
    assert len({t.sum().item() for t in a}) > 1  # random crop / flip
    torch.manual_seed(0)
    b = torch.stack([s.train[3][0] for _ in range(8)])
    assert torch.equal(a, b)  # driven by torch's seeded RNG
    assert torch.equal(s.val[5][0], s.val[5][0])
    s2 = D.load_cifar_splits("cifar10", tmp_path, val_size=200)
    assert torch.equal(s.val.labels, s2.val.labels) and torch.equal(s.val.images, s2.val.images)
    up = D.load_cifar_splits("cifar10", tmp_path, val_size=200, upscale=40)
    assert up.test[0][0].shape == (3, 40, 40)


def test_loaders_deterministic_per_epoch(digits):
    def order(seed, epoch):
        L = D.make_loaders(digits, 100, seed)
        L.set_epoch(epoch)
        return torch.cat([y for _, y in L.train])

    assert torch.equal(order(0, 3), order(0, 3))
    assert not torch.equal(order(0, 3), order(0, 4))
    assert not torch.equal(order(0, 3), order(1, 3))
    L = D.make_loaders(digits, 100, 0)
    assert sum(len(y) for _, y in L.val) == len(digits.val)
    assert torch.equal(torch.cat([y for _, y in L.test]), digits.test.tensors[1])  # in order


# --------------------------------------------------------------------------------------
# recipes and the shift penalty
# --------------------------------------------------------------------------------------


def test_param_groups_exclude_shift_and_norm_from_decay():
    model = build_model("resnet20", "shift", in_channels=1, width=0.25)  # PS everywhere, classifier has a bias
    recipe = T.recipe_for("shift", optimizer="sgd")
    groups = {g["name"]: g for g in T.param_groups(model, recipe)}
    ps = [m for m in model.modules() if isinstance(m, (ShiftConv2d, ShiftLinear))]
    shift_ids = {id(p) for m in ps for p in (m.shift, m.sign)}
    assert {id(p) for p in groups["shift"]["params"]} == shift_ids
    assert groups["shift"]["weight_decay"] == 0 and groups["shift"]["lr"] == recipe.shift_lr < recipe.lr
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert norm_ids <= no_decay and id(model.fc.bias) in no_decay
    assert groups["no_decay"]["weight_decay"] == 0
    assert not ({id(p) for p in groups.get("decay", {"params": []})["params"]} & (shift_ids | norm_ids))
    # every parameter exactly once
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    # conv model: conv / linear weights decay, with the recipe's weight decay
    conv = build_model("resnet20", "conv", in_channels=1, width=0.25)
    g = {g["name"]: g for g in T.param_groups(conv, T.recipe_for("conv"))}
    assert g["decay"]["weight_decay"] == 5e-4 and "shift" not in g
    assert {id(p) for p in g["decay"]["params"]} == {id(m.weight) for m in conv.modules()
                                                    if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_recipe_defaults():
    assert T.recipe_for("conv").optimizer == "sgd" and T.recipe_for("conv").lr == 0.1
    assert T.recipe_for("adder").weight_decay == 5e-4 and T.recipe_for("adder").shift_lr is None
    r = T.recipe_for("shift")
    assert r.optimizer == "adam" and r.shift_lr is not None
    assert T.recipe_for("shift", mode="q").optimizer == "sgd"
    assert T.recipe_for("shiftadd").shift_lr == 0.01 < T.recipe_for("shiftadd").lr
    assert T.recipe_for("conv", "cifar10").epochs == 200
    assert T.recipe_for("conv", epochs=3).epochs == 3
    assert [round(T.cosine_factor(e, 4), 6) for e in range(5)] == [1.0, 0.853553, 0.5, 0.146447, 0.0]
    with pytest.raises(ValueError):
        T.recipe_for("conv", optimizer="lbfgs")


def test_shift_penalty_added_to_loss():
    torch.manual_seed(0)
    model = build_model("resnet20", "shift", in_channels=1, width=0.25)
    out, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    recipe = T.recipe_for("shift", weight_decay=0.01)
    total, ce = T.compute_loss(model, out, y, recipe)
    pen = sum(0.5 * (2.0 ** m.shift).square().sum() for m in model.modules()
              if isinstance(m, (ShiftConv2d, ShiftLinear)))
    torch.testing.assert_close(ce, nn.functional.cross_entropy(out, y))
    torch.testing.assert_close(total, ce + 0.01 * pen)
    total.backward()
    assert model.fc.shift.grad is not None and model.fc.shift.grad.abs().sum() > 0
    # no penalty for a model without PS layers, or when switched off
    conv = build_model("resnet20", "conv", in_channels=1, width=0.25)
    plain = T.compute_loss(conv, out, y, recipe)
    assert plain[0] is plain[1]
    off = T.compute_loss(model, out, y, T.recipe_for("shift", shift_penalty=False))
    assert off[0] is off[1]


def test_shift_penalty_shrinks_shifts_in_training(digits):
    """With only P trainable (lr 0 elsewhere), a large penalty weight drives 2^P down."""
    def run(wd):
        torch.manual_seed(0)
        model = build_model("resnet20", "shift", in_channels=1, width=0.25)
        recipe = T.Recipe("sgd", lr=0.0, momentum=0.0, weight_decay=wd, shift_lr=0.5, epochs=1, batch_size=256)
        T.train(model, digits, recipe=recipe, progress=False)
        return T.penalty(model).item()

    assert run(1.0) < 0.8 * run(0.0)


# --------------------------------------------------------------------------------------
# training, checkpoints, resume
# --------------------------------------------------------------------------------------


def test_two_epoch_digits_run_beats_chance(digits, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", "conv", digits.num_classes, digits.in_channels)
    hist = T.train(model, digits, epochs=2, recipe=T.recipe_for("conv"), out_dir=str(tmp_path), seed=0,
                   progress=False, meta={"model": "resnet20"})
    assert hist["epoch"] == [1, 2] and len(hist["val_acc"]) == 2 and len(hist["seconds"]) == 2
    assert hist["lr"] == [0.1, pytest.approx(0.05)]
    f = json.loads((tmp_path / "final.json").read_text())
    assert f["test_acc"] > 0.5 and f["val_acc"] > 0.5  # chance is 0.1
    assert f["params"] == sum(p.numel() for p in model.parameters()) and f["epochs"] == 2 and f["seconds"] > 0
    assert f["model"] == "resnet20" and f == hist["final"]
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    fresh = build_model("resnet20", "conv", 10, 1)
    fresh.load_state_dict(saved["state_dict"])
    _, acc = T.evaluate(fresh, D.make_loaders(digits, 64, 0).test)
    assert acc == pytest.approx(f["test_acc"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("variant", ["conv", "shift", "shiftadd"])
def test_resume_is_bit_identical(digits, tmp_path, variant):
    def fresh(init_seed):
        torch.manual_seed(init_seed)
        return build_model("resnet20", variant, 10, 1, width=0.25)

    recipe = T.recipe_for(variant, epochs=3, batch_size=128)
    straight = fresh(0)
    h1 = T.train(straight, digits, recipe=recipe, out_dir=str(tmp_path / "a"), seed=5, progress=False)

    def stop_at_2(epoch, hist):
        if epoch == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        T.train(fresh(0), digits, recipe=recipe, out_dir=str(tmp_path / "b"), seed=5, progress=False,
                on_epoch_end=stop_at_2)
    ck = torch.load(tmp_path / "b" / T.CHECKPOINT, weights_only=False)
    assert ck["epoch"] == 2 and set(ck["rng"]) >= {"torch", "numpy", "python", "loader"}
    ran = []
    resumed = fresh(99)  # different init: everything must come from the checkpoint
    h2 = T.train(resumed, digits, recipe=recipe, out_dir=str(tmp_path / "b"), resume=True, seed=5, progress=False,
                 on_epoch_end=lambda e, h: ran.append(e))
    assert ran == [3]
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"differs after resume: {diff[:5]}"
    for k in ("train_loss", "train_acc", "val_acc", "lr"):
        assert h1[k] == h2[k]
    assert h1["final"]["test_acc"] == h2["final"]["test_acc"]
    oa = torch.load(tmp_path / "a" / T.CHECKPOINT, weights_only=False)["optimizer"]["state"]
    ob = torch.load(tmp_path / "b" / T.CHECKPOINT, weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i] if torch.is_tensor(oa[i][k]))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    T.atomic_save({"v": torch.arange(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(T.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        T.atomic_save({"v": torch.arange(5)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["v"], torch.arange(3))  # the old checkpoint survives
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left behind


def test_resume_rejects_other_epoch_count(digits, tmp_path):
    torch.manual_seed(0)
    m = build_model("resnet20", "conv", 10, 1, width=0.25)
    T.train(m, digits, recipe=T.recipe_for("conv", epochs=1, batch_size=256), out_dir=str(tmp_path),
            progress=False)
    with pytest.raises(ValueError, match="epochs"):
        T.train(m, digits, recipe=T.recipe_for("conv", epochs=2, batch_size=256), out_dir=str(tmp_path),
                resume=True, progress=False)


def test_resume_refuses_other_settings_and_unreadable_checkpoints(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["--epochs", "1", "--batch-size", "256", "--width", "0.25", "--out", out, "--no-progress"]
    assert T.main(base) == 0
    final = (tmp_path / "run" / "final.json").read_text()
    capsys.readouterr()
    assert T.main(base + ["--variant", "adder", "--lr", "0.5", "--seed", "9", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "meta.variant 'conv' -> 'adder'" in err and "seed 0 -> 9" in err
    assert (tmp_path / "run" / "final.json").read_text() == final  # nothing rewritten
    ck = tmp_path / "run" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    assert T.main(base + ["--resume"]) == 2
    assert "cannot read the checkpoint" in capsys.readouterr().err


def test_cli_arguments_are_checked(capsys):
    for arg, value in (("--epochs", "0"), ("--batch-size", "0"), ("--lr", "-1"), ("--width", "0"),
                       ("--threads", "-1"), ("--upscale", "0"), ("--weight-bits", "9"), ("--num-workers", "-1")):
        with pytest.raises(SystemExit) as e:
            T.main([arg, value])
        assert e.value.code == 2 and f"argument {arg}" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert T.main(["--device", "cuda", "--epochs", "1"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["conv", "adder"])
def test_amp_bfloat16_cpu(digits, variant):
    torch.manual_seed(0)
    model = build_model("resnet20", variant, 10, 1, width=0.25)
    hist = T.train(model, digits, recipe=T.recipe_for(variant, epochs=1, batch_size=128), amp=True,
                   progress=False)
    assert np.isfinite(hist["train_loss"][0]) and hist["final"]["amp"] is True
    seen = []
    h = model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 1, 8, 8))
    h.remove()
    assert seen == [torch.bfloat16]


def test_cli_main(tmp_path, capsys):
    out = tmp_path / "run"
    rc = T.main(["--model", "resnet20", "--variant", "shift", "--epochs", "1", "--batch-size", "256", "--width",
                 "0.25", "--out", str(out), "--no-progress", "--seed", "3", "--weight-bits", "4"])
    assert rc == 0
    f = json.loads((out / "final.json").read_text())
    assert f["variant"] == "shift" and f["epochs"] == 1 and f["seed"] == 3 and f["recipe"]["optimizer"] == "adam"
    assert f["layer_kwargs"] == {"weight_bits": 4}
    assert "test acc" in capsys.readouterr().out
    loaded = T.load_model(str(out / "model.pt"))
    assert all(m.weight_bits == 4 for m in loaded.modules() if isinstance(m, (ShiftConv2d, ShiftLinear)))
    _, acc = T.evaluate(loaded, D.make_loaders(D.load_dataset("digits"), 64, 0).test)
    assert acc == pytest.approx(f["test_acc"])
    with pytest.raises(ValueError, match="not written by shiftadd train"):
        torch.save({"state_dict": loaded.state_dict()}, out / "bare.pt")
        T.load_model(str(out / "bare.pt"))
    assert T.build_parser().prog == "shiftadd train"
    # --resume on a finished run: no more training, same result
    assert T.main(["--variant", "shift", "--epochs", "1", "--batch-size", "256", "--width", "0.25", "--out", str(out),
                   "--no-progress", "--seed", "3", "--weight-bits", "4", "--resume"]) == 0
    assert json.loads((out / "final.json").read_text())["test_acc"] == f["test_acc"]


def test_ddp_two_process_gloo(tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): one digits epoch, rank 0 writes."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "ddp"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "shiftadd.train", "--epochs", "1", "--width",
           "0.25", "--batch-size", "64", "--out", str(out), "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads((out / "final.json").read_text())
    assert f["world_size"] == 2 and f["test_acc"] > 0.2
