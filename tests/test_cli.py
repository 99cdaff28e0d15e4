"""The command line: bad input is one line on stderr, exit 2, and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import autodecomp as ad
from autodecomp.cli import main

GOOD = {
    "model": "digits_cnn",
    "data": {"name": "digits", "image_size": 8},
    "space": {"methods": ["tucker"]},
    "trials": 2,
}


def _write(folder: Path, **changes) -> Path:
    raw = {**GOOD, **changes}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fails(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("autodecomp: error: ")
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"proxy": {"stepz": 3}}, ["unknown key proxy.stepz", "steps"]),
        ({"space": {"methods": ["tuckr"]}}, ["'tuckr'", "tucker"]),
        ({"space": {"layers": {"include": ["block*"]}}}, ["'block*'", "conv2"]),
        ({"data": {"name": "cifar10", "root": "missing"}}, ["data.root", "missing"]),
        ({"data": {"name": "imagenet"}}, ["'imagenet'", "cifar10"]),
        ({"sampler": "cmaes"}, ["'cmaes'", "tpe, nsga2, random, gp"]),
        ({"storage": "sqlite:////no/such/folder/x.db"}, ["/no/such/folder"]),
    ],
    ids=["unknown-key", "bad-method", "bad-glob", "missing-data", "bad-data", "bad-sampler", "db"],
)
def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, changes, expected):
    path = _write(tmp_path, **changes)
    _fails(capsys, ["search", str(path)], *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_bad_arguments_exit_2(tmp_path, capsys):
    path = _write(tmp_path)
    _fails(capsys, ["search", str(path), "--set", "trials"], "key.sub=value")
    _fails(capsys, ["search", str(path), "--trials", "0"], "--trials")
    _fails(capsys, ["search", str(tmp_path / "nope.yaml")], "cannot read", "nope.yaml")
    _fails(capsys, ["search", str(path), "--storage", "not a url"], "not a database URL")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_unreachable_server_storage(tmp_path, capsys):
    path = _write(tmp_path)
    url = "postgresql://user:secret@127.0.0.1:9/none"  # port 9: nothing listens
    err = _fails(capsys, ["search", str(path), "--storage", url], "cannot reach storage")
    assert "secret" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_methods_lists_every_method(capsys):
    from autodecomp.cli import _TYPICAL_LAYERS

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    assert header.split()[:2] == ["method", "3x3"] and header.rstrip().endswith("rank spec")
    for name in ad.methods():
        row = next(line for line in lines if line.split()[0] == name)
        cls = ad.get_method(name)
        assert row.endswith(cls.rank_help)
        for label, (args, kwargs) in _TYPICAL_LAYERS.items():
            supported = cls.unsupported_reason(ad.ConvSpec.create(*args, **kwargs)) is None
            start = header.index(label)
            assert row[start:].split()[0] == ("yes" if supported else "-"), (name, label)


def test_python_dash_m(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "autodecomp", "search", str(_write(tmp_path, trials="x"))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("autodecomp: error: trials must be an integer")
