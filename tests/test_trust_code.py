"""`autodecomp.load` builds only registered / torchvision models unless ``trust_code=True``.

The file's SHA-256 has no key: anyone can rewrite a file and recompute it (``save_model``
does exactly that), so a file naming ``package.module:callable`` must not run that code.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import autodecomp as ad
from autodecomp.ship import model_file
from autodecomp.workload.models import is_builtin_model

SHAPE = (1, 8, 8)


def _meta(name: str, kwargs: dict, plan: dict | None = None) -> dict:
    return {
        "model": {"name": name, "kwargs": kwargs, "num_classes": 10, "in_channels": 1},
        "plan": plan or {},
        "input_shape": list(SHAPE),
    }


@pytest.fixture
def hub_repo(tmp_path: Path) -> tuple[Path, Path]:
    """A local torch.hub repository whose ``hubconf.py`` leaves a marker when imported."""
    repo, marker = tmp_path / "repo", tmp_path / "hubconf-ran"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        textwrap.dedent(f"""
            from pathlib import Path
            from torch import nn

            Path({str(marker)!r}).write_text("ran")


            def tiny(num_classes=10):
                return nn.Linear(1, num_classes)
        """)
    )
    return repo, marker


def test_torch_hub_file_is_refused_without_running_hubconf(tmp_path, hub_repo):
    repo, marker = hub_repo
    kwargs = {"repo_or_dir": str(repo), "model": "tiny", "source": "local"}
    path = model_file.save_model(
        nn.Linear(1, 10), tmp_path / "hub.pt", _meta("torch.hub:load", kwargs)
    )
    meta = model_file.read_metadata(path)  # the digest is valid: it was recomputed
    with pytest.raises(ValueError, match=r"'torch\.hub:load'.*trust_code=True") as info:
        ad.load(path)
    assert "\n" not in str(info.value) and "corruption, not" in str(info.value)
    with pytest.raises(ValueError, match="trust_code=True"):
        model_file.rebuild(meta)
    assert not marker.exists()
    # the attack is real: opting in runs hubconf.py
    loaded = ad.load(path, trust_code=True)
    assert marker.exists() and isinstance(loaded, nn.Linear)


def test_logging_file_is_refused_without_truncating_anything(tmp_path, monkeypatch):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    kwargs = {"filename": str(target), "filemode": "w"}
    path = model_file.save_model(
        nn.Linear(1, 10), tmp_path / "log.pt", _meta("logging:basicConfig", kwargs)
    )
    with pytest.raises(ValueError, match=r"'logging:basicConfig'.*trust_code=True"):
        ad.load(path)
    assert target.read_text() == "keep me"
    # the attack is real: with the root logger bare (as in a fresh process), opting in
    # truncates the file before basicConfig complains about num_classes
    monkeypatch.setattr(logging.root, "handlers", [])
    with pytest.raises(ValueError, match="Unrecognised argument"):
        ad.load(path, trust_code=True)
    for handler in logging.root.handlers:
        handler.close()
    assert target.read_text() == ""


def test_trusted_user_model_loads(tmp_path, monkeypatch):
    (tmp_path / "trusted_zoo_for_load.py").write_text(
        textwrap.dedent("""
            from torch import nn


            def build(num_classes=10, in_channels=3, width=8):
                return nn.Sequential(
                    nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
                )
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "trusted_zoo_for_load:build"
    dense = ad.get_model(name, num_classes=10, in_channels=1, width=8).eval()
    plan = {"2": {"method": "tucker", "ratio": 0.5}}
    model = ad.apply_plan(dense, plan).eval()
    meta = _meta(name, {"width": 8}, model_file.explicit_plan(model, plan))
    path = model_file.save_model(model, tmp_path / "user.pt", meta)
    with pytest.raises(ValueError, match="trust_code"):
        ad.load(path)
    loaded = ad.load(path, trust_code=True)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_only_registered_and_torchvision_models_are_built_without_trust():
    assert is_builtin_model("digits_cnn") and is_builtin_model("resnet18")
    assert not is_builtin_model("torch.hub:load") and not is_builtin_model("os:system")


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(model="digits_cnn"),
        lambda m: m["model"].update(kwargs=["x"]),
        lambda m: m["model"].update(num_classes="10"),
        lambda m: m.update(plan=None),
    ],
    ids=["model", "kwargs", "num_classes", "plan"],
)
def test_malformed_metadata_with_a_valid_digest_is_one_line(tmp_path, change):
    meta = _meta("digits_cnn", {})
    change(meta)
    path = model_file.save_model(nn.Linear(1, 10), tmp_path / "bad.pt", meta)
    with pytest.raises(ValueError, match="not a valid model file") as info:
        ad.load(path)
    assert "\n" not in str(info.value)


def test_unfitting_builtin_kwargs_are_one_line(tmp_path):
    path = model_file.save_model(
        nn.Linear(1, 10), tmp_path / "k.pt", _meta("digits_cnn", {"wings": 2})
    )
    with pytest.raises(ValueError, match="cannot build the described model") as info:
        ad.load(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ad.methods())
def test_ratio_above_one_is_refused(method):
    conv = nn.Conv2d(8, 12, 3, padding=1)
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\] .*got 1\.5"):
        ad.decompose_conv(conv, method, ratio=1.5)
