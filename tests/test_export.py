"""`autodecomp export` and `autodecomp.load`: rebuild, save, load back, refuse tampering."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_study import SHORT_PROXY, make_study, tiny_config

import autodecomp as ad
from autodecomp.config import load_config
from autodecomp.core.errors import ConfigError
from autodecomp.core.logs import console_logging
from autodecomp.results import report
from autodecomp.ship import export, model_file
from autodecomp.workload.models import get_model

STUDY = tiny_config(
    baseline={"epochs": 3},
    space={"methods": ["tucker", "shift", "gkpd"]},
    proxy=SHORT_PROXY,
    budgets={"max_macs": 0.9},
    trials=3,
    # one trial per method whose ratio resolves through the weights: the shift channels per
    # slice follow singular values, gkpd chooses its factor shapes
    warm_start=[
        {"method": "shift", "ratio": 0.3},
        {"method": "gkpd", "ratio": 0.3},
        {"method": "tucker", "ratio": 0.3},
    ],
)
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """A finished tiny study (3 trials: shift, gkpd, tucker) with its cached baseline."""
    return make_study(tmp_path_factory.mktemp("export"), STUDY, search=True)


@pytest.fixture(scope="module")
def exported(searched, tmp_path_factory):
    cfg, out = load_config(searched), tmp_path_factory.mktemp("models")
    return [export.export_trial(cfg, n, out / f"t{n}.pt") for n in range(3)]


def _x() -> torch.Tensor:
    return torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(7))


def test_load_gives_identical_outputs(exported):
    methods = set()
    for result in exported:
        loaded = model_file.load(result.path)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(_x()), result.model.eval()(_x()))
        methods |= {e["method"] for e in result.meta["plan"].values()}
    assert methods == {"shift", "gkpd", "tucker"}


def test_macs_and_params_equal_the_study_tables(searched, exported):
    study = report.read_study(str(searched.parent / "study.db"))
    trials = report.trials_frame(study).set_index("number")
    for n, result in enumerate(exported):
        loaded = model_file.load(result.path)
        macs, params = ad.count_macs(loaded, SHAPE), ad.count_params(loaded)
        assert (macs, params) == (trials.macs[n], trials.params[n])
        assert (macs, params) == (result.meta["metrics"]["macs"], result.meta["metrics"]["params"])


def test_explicit_ranks_rebuild_the_structure_without_weights(exported):
    shift = next(r for r in exported if r.meta["search_plan"]["conv3"]["method"] == "shift")
    ranks = shift.meta["plan"]["conv3"]["rank"]
    assert isinstance(ranks, list) and len(ranks) == 9  # per-slice ranks, not {"channels": R}
    for result in exported:
        skeleton = model_file.rebuild(result.meta)
        dense = get_model("digits_cnn", in_channels=1)  # random weights
        random = ad.apply_plan(dense, result.meta["plan"])  # the explicit ranks, factorised
        shapes = {k: v.shape for k, v in random.state_dict().items()}
        assert {k: v.shape for k, v in skeleton.state_dict().items()} == shapes
        assert shapes == {k: v.shape for k, v in result.model.state_dict().items()}


def test_metadata_is_self_describing(exported):
    meta = model_file.read_metadata(exported[2].path)
    assert meta["format"] == "autodecomp-model" and meta["format_version"] == 1
    assert meta["model"] == {"name": "digits_cnn", "kwargs": {}, "num_classes": 10,
                             "in_channels": 1}  # fmt: skip
    assert meta["input_shape"] == list(SHAPE)
    assert meta["source"]["trial"] == 2
    assert meta["source"]["finetune"] == {
        "bn_batches": 1, "proxy_steps": 4, "proxy_lr": 0.01, "epochs": 0, "steps": 0, "lr": 0.01
    }  # fmt: skip
    assert set(meta["versions"]) == {"torch", "autodecomp", "python"}
    assert 0 <= meta["metrics"]["test_accuracy"] <= 1
    # the default replays the search's proxy fine-tune: same validation accuracy
    assert meta["metrics"]["val_accuracy"] == meta["metrics"]["search_val_accuracy"]


def test_load_keeps_the_global_random_state(exported):
    torch.manual_seed(3)
    model_file.load(exported[0].path)
    after_load = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(1), after_load)


def _tampered(path: Path, tmp_path: Path, change) -> Path:
    blob = torch.load(path, weights_only=True)
    change(blob)
    out = tmp_path / "tampered.pt"
    torch.save(blob, out)
    return out


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b["state_dict"]["conv1.weight"].view(-1)[0].add_(1e-3),
        lambda b: b["metrics"].update(test_accuracy=1.0),
        lambda b: b["plan"]["conv3"].update(method="keep"),
        lambda b: b.update(sha256="0" * 64),
    ],
    ids=["weight", "metrics", "plan", "hash"],
)
def test_tampered_file_is_refused(exported, tmp_path, change):
    path = _tampered(exported[0].path, tmp_path, change)
    with pytest.raises(ValueError, match="integrity check failed"):
        model_file.load(path)


class _Payload:
    pass


def test_arbitrary_pickles_and_foreign_files_are_refused(tmp_path):
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "autodecomp-model", "x": _Payload()}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        model_file.load(pickled)
    weights = tmp_path / "weights.pt"
    torch.save(get_model("digits_cnn", in_channels=1).state_dict(), weights)
    with pytest.raises(ValueError, match="not a model file written by autodecomp export"):
        model_file.load(weights)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a model file"):
        model_file.load(text)


def test_save_and_load_every_method(tmp_path):
    base = get_model("digits_cnn", in_channels=1).eval()
    for method in ad.supporting_methods(ad.ConvSpec.from_conv(base.conv3)):
        plan = {"conv3": {"method": method, "ratio": 0.3}, "conv4": {"method": "keep"}}
        model = ad.apply_plan(base, plan).eval()
        meta = {
            "model": {"name": "digits_cnn", "kwargs": {}, "num_classes": 10, "in_channels": 1},
            "plan": model_file.explicit_plan(model, plan),
            "input_shape": list(SHAPE),
        }
        path = model_file.save_model(model, tmp_path / f"{method}.pt", meta)
        loaded = model_file.load(path)
        with torch.no_grad():
            assert torch.equal(loaded(_x()), model(_x())), method


def test_torch_export_format(searched, tmp_path):
    result = export.export_trial(load_config(searched), 2, tmp_path / "m.pt2", fmt="torch-export")
    extra = {"autodecomp.json": ""}
    program = torch.export.load(result.path, extra_files=extra)
    with torch.no_grad():
        assert torch.allclose(program.module()(_x()), result.model(_x()), atol=1e-5)
    assert json.loads(extra["autodecomp.json"])["plan"] == result.meta["plan"]
    with pytest.raises(ValueError, match=r"torch\.export\.load"):
        model_file.load(result.path)


def test_onnx_without_its_packages_is_a_clear_error(searched, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="pip install onnx"):
        export.export_trial(load_config(searched), 0, tmp_path / "m.onnx", fmt="onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_format(searched, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    result = export.export_trial(load_config(searched), 0, tmp_path / "m.onnx", fmt="onnx")
    proto = onnx.load(result.path)
    onnx.checker.check_model(proto)
    meta = json.loads({e.key: e.value for e in proto.metadata_props}["autodecomp"])
    assert meta["plan"] == result.meta["plan"] and meta["metrics"]["macs"] > 0


def test_fine_tune_epochs(searched, tmp_path):
    result = export.export_trial(
        load_config(searched), 1, tmp_path / "m.pt", finetune_epochs=1, lr=0.02
    )
    finetune = result.meta["source"]["finetune"]
    assert finetune["proxy_steps"] == 4 and finetune["epochs"] == 1 and finetune["lr"] == 0.02
    assert finetune["steps"] == 1257 // 32  # one pass over the digits training split, batch 32


def test_unknown_or_unfinished_trial_lists_the_front(searched, tmp_path):
    with pytest.raises(ConfigError, match=r"trial 9 .* does not exist; Pareto-front trials: "):
        export.export_trial(load_config(searched), 9, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_changed_config_is_refused(searched, tmp_path):
    cfg = load_config(searched, ["proxy.steps=5"])
    with pytest.raises(ConfigError, match="'proxy' section"):
        export.export_trial(cfg, 0, tmp_path / "m.pt")


def test_cli(searched, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    run = export.configure_parser(parser)
    out = tmp_path / "cli.pt"
    with console_logging():  # the lines `autodecomp export` prints
        assert run(parser.parse_args([str(searched), "--trial", "2", "-o", str(out)])) == 0
    assert f"wrote {out}: test accuracy" in capsys.readouterr().out
    assert model_file.read_metadata(out)["source"]["trial"] == 2
