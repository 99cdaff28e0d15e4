"""Bad input at the command line, run as a user runs it (``python -m autodecomp ...``).

Every case must end with exit status 2, exactly one line ``autodecomp: error: ...`` on
stderr naming the bad value, no traceback anywhere in the output, and its folder (the study,
its cache and any model file) byte for byte as it was. Each case runs in a folder of its
own (a copy of the shared tiny study where it needs one); the processes run a few at a time
because each pays the package's import (4-5 s of CPU). The cases that need a searched study
or reach training are marked slow: without them the file takes about two minutes on two
cores.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny_study import make_study, tiny_config

from autodecomp.workload.models import get_model

GOOD: dict[str, Any] = tiny_config(
    baseline={"epochs": 1},
    space={"methods": ["tucker"], "ratio": None},
    proxy={"steps": 2, "batch_size": 32, "bn_batches": 1, "calibration_size": 8},
    trials=1,
)

# User code the cases name as ``package.module:callable`` (on PYTHONPATH of the processes).
USER_CODE = """
from torch import nn

NOT_CALLABLE = 42


def raises(num_classes, **kwargs):
    raise RuntimeError("out of coffee")


def returns_none(num_classes, **kwargs):
    return None


def five_classes(num_classes, in_channels=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )


def data_raises(**kwargs):
    raise OSError("disk on fire")


def data_none(**kwargs):
    return None
"""
BROKEN_IMPORT = 'raise RuntimeError("this module fails when imported")\n'

Build = Callable[[Path, Path], list[str]]  # (case folder, shared tiny study) -> CLI arguments


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    expected: tuple[str, ...]


def _write(folder: Path, name: str = "study.yaml", **changes: Any) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({**GOOD, **changes}))
    return path


def _search(**changes: Any) -> Build:
    """``search`` on a fresh ``study.yaml``: GOOD with ``changes``."""
    return lambda folder, study: ["search", str(_write(folder, **changes))]


def _space(**changes: Any) -> Build:
    return _search(space={**GOOD["space"], **changes})


def _text(content: str) -> Build:
    def build(folder: Path, study: Path) -> list[str]:
        (folder / "study.yaml").write_text(content)
        return ["search", str(folder / "study.yaml")]

    return build


def _copy(folder: Path, study: Path) -> Path:
    """A private copy of the shared tiny study, its SQLite database checkpointed (no ``-wal``
    file a reader would fold in); returns its ``study.yaml``."""
    copy = shutil.copytree(study.parent, folder / "tiny")
    with closing(sqlite3.connect(copy / "study.db")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return copy / "study.yaml"


def _on_copy(*args: str, before: Callable[[Path], None] | None = None) -> Build:
    """``args`` with ``{study}`` and ``{folder}`` filled in, on a copy of the tiny study."""

    def build(folder: Path, study: Path) -> list[str]:
        path = _copy(folder, study)
        if before is not None:
            before(path.parent)
        return [a.format(study=path, folder=path.parent) for a in args]

    return build


def _checkpoint(content: Callable[[Path], None]) -> Build:
    """``search`` with ``baseline.checkpoint: model.pt`` holding ``content``."""

    def build(folder: Path, study: Path) -> list[str]:
        content(folder / "model.pt")
        return ["search", str(_write(folder, baseline={"checkpoint": "model.pt"}))]

    return build


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01garbage, not a checkpoint" * 10)


def _truncated(path: Path) -> None:
    torch.save(get_model("digits_cnn", in_channels=1).state_dict(), path)
    path.write_bytes(path.read_bytes()[:500])


def _pickled(path: Path) -> None:
    torch.save(get_model("digits_cnn", in_channels=1), path)  # a whole model, not weights


def _other_model(path: Path) -> None:
    torch.save(get_model("resnet20", in_channels=1).state_dict(), path)


def _nan_weights(path: Path) -> None:
    state = get_model("digits_cnn", in_channels=1).state_dict()
    state["conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)


def _corrupt_cache(folder: Path) -> None:
    for pt in (folder / "cache").glob("baseline-*.pt"):
        pt.write_bytes(pt.read_bytes()[:300])


def _garbage_cache_record(folder: Path) -> None:
    for record in (folder / "cache").glob("baseline-*.json"):
        record.write_text("{not json")


def _missing_cache(folder: Path) -> None:
    for pt in (folder / "cache").glob("baseline-*.pt"):
        pt.unlink()


def _images(corrupt: bool) -> Build:
    """An imagefolder data set of 8x8 images (one of them garbage when ``corrupt``)."""

    def build(case: Path, study: Path) -> list[str]:
        rng = np.random.default_rng(0)
        for part in ("train", "test"):
            for label in ("ant", "bee"):
                where = case / "images" / part / label
                where.mkdir(parents=True)
                for i in range(6):
                    pixels = (rng.random((8, 8, 3)) * 255).astype("uint8")
                    Image.fromarray(pixels).save(where / f"{i}.png")
        if corrupt:
            (case / "images" / "train" / "bee" / "broken.png").write_bytes(b"not a png")
        data = {"name": "imagefolder", "root": "images", "image_size": 8, "channels": 1}
        return ["search", str(_write(case, data=data, baseline={"epochs": 1, "batch_size": 4}))]

    return build


def _export(*args: str, before: Callable[[Path], None] | None = None) -> Build:
    """``export`` on a copy of the searched tiny study."""
    return _on_copy("export", "{study}", *args, before=before)


def _export_fresh(*args: str) -> Build:
    """``export`` of a study never searched: what is checked before any work."""

    def build(folder: Path, study: Path) -> list[str]:
        path = _write(folder)
        return ["export", str(path), *(a.format(study=path, folder=folder) for a in args)]

    return build


def _argv(*args: str) -> Build:
    """``search`` on GOOD with extra arguments."""
    return lambda folder, study: ["search", str(_write(folder)), *args]


CASES = [  # each fails before anything heavy: together they take about a minute or two
    # -- the files themselves
    Case("yaml-malformed", _text("model: [digits_cnn\n"), ("study.yaml",)),
    Case("yaml-not-a-mapping", _text("- model\n- data\n"), ("mapping",)),
    Case("study-missing", lambda f, s: ["search", str(f / "nope.yaml")], ("nope.yaml",)),
    # -- names
    Case("unknown-key", _search(trails=3), ("trails", "trials")),
    Case("unknown-nested-key", _search(proxy={"stepz": 3}), ("proxy.stepz", "steps")),
    Case("unknown-method", _space(methods=["tuckr"]), ("'tuckr'", "tucker")),
    Case("unknown-model", _search(model="resnet1000"), ("'resnet1000'", "resnet20")),
    Case("unknown-data", _search(data={"name": "imagenet"}), ("'imagenet'", "cifar10")),
    Case("unknown-sampler", _search(sampler="cmaes"), ("'cmaes'", "tpe")),
    Case("unknown-objective", _search(objectives=["accuracy", "flops"]), ("'flops'", "macs")),
    Case("unknown-device", _search(device="tpu"), ("'tpu'", "cpu")),
    Case("unknown-layer-glob", _space(layers={"include": ["block*"]}), ("'block*'", "conv2")),
    Case("unknown-warm-start", _search(warm_start=[{"method": "cpp", "ratio": 0.3}]), ("cpp",)),
    # -- values
    Case("bad-rank-type", _space(ranks={"tucker": ["a"]}), ("'a'", "space.ranks.tucker")),
    Case("rank-out-of-range", _space(ranks={"tucker": [[1000, 1000]]}), ("(1000, 1000)",)),
    Case("ratio-above-1", _space(ratio=[0.1, 1.5]), ("space.ratio", "1.5", "(0, 1]")),
    Case(
        "ratio-above-1-override",
        _space(overrides=[{"layers": "conv3", "ratio": [0.2, 3]}]),
        ("space.overrides[0].ratio", "3", "(0, 1]"),
    ),
    Case("shift-prune-1", _space(methods=["shift"], shift_prune=[0, 1.2]), ("[0, 1)", "1.2")),
    Case("budget", _search(budgets={"max_macs": "lots"}), ("budgets.max_macs", "'lots'")),
    Case("epochs-0", _search(baseline={"epochs": 0}), ("baseline.epochs",)),
    Case("trials-flag-0", _argv("--trials", "0"), ("--trials",)),
    Case("set-bad-key", _argv("--set", "proxy.nope=1"), ("proxy.nope",)),
    Case("storage-url", _argv("--storage", "not a url"), ("'not a url'",)),
    # -- data and checkpoints on disk
    Case("data-root-missing", _search(data={"name": "cifar10", "root": "no-cifar"}), ("no-cifar",)),
    Case("imagefolder-empty", _search(data={"name": "imagefolder", "root": "."}), ("train",)),
    Case("checkpoint-missing", _search(baseline={"checkpoint": "gone.pt"}), ("gone.pt",)),
    Case("checkpoint-garbage", _checkpoint(_garbage), ("model.pt", "not a PyTorch file")),
    Case("checkpoint-pickled", _checkpoint(_pickled), ("model.pt", "state dict")),
    Case("checkpoint-other-model", _checkpoint(_other_model), ("model.pt", "does not fit")),
    Case("checkpoint-nan", _checkpoint(_nan_weights), ("model.pt", "conv2.weight", "non-finite")),
    # -- user code
    Case("model-raises", _search(model="badcode:raises"), ("'badcode:raises'", "out of coffee")),
    Case("model-none", _search(model="badcode:returns_none"), ("returns_none", "NoneType")),
    Case(
        "model-classes",
        _search(model="badcode:five_classes", space={"methods": ["tucker"]}),
        ("five_classes", "10 classes"),
    ),
    Case("model-not-callable", _search(model="badcode:NOT_CALLABLE"), ("NOT_CALLABLE",)),
    Case("model-import-fails", _search(model="brokenimport:build"), ("brokenimport",)),
    Case("data-raises", _search(data={"name": "badcode:data_raises"}), ("data_raises", "fire")),
    Case("data-none", _search(data={"name": "badcode:data_none"}), ("data_none", "DataSplits")),
    # -- export's output checked before any work
    Case("export-o-directory", _export_fresh("--trial", "0", "-o", "{folder}"), ("directory",)),
    Case(
        "export-o-under-a-file",
        _export_fresh("--trial", "0", "-o", "{study}/m.pt"),
        ("study.yaml", "not a folder"),
    ),
    Case(
        "export-o-unwritable",
        _export_fresh("--trial", "0", "-o", "/proc/autodecomp.pt"),
        ("/proc",),
    ),
    Case(
        "export-negative-epochs",
        _export_fresh("--trial", "0", "--finetune-epochs", "-1"),
        ("--finetune-epochs",),
    ),
]

SLOW_CASES = [  # these train, read a searched study or import more: a copy of one each
    Case("ratio-reversed", _space(ratio=[0.5, 0.1]), ("space.ratio.range", "[0.5, 0.1]")),
    Case("trials-text", _search(trials="many"), ("trials", "'many'")),
    Case("val-fraction", _search(data={"name": "digits", "val_fraction": 1.5}), ("1.5",)),
    Case("set-no-value", _argv("--set", "trials"), ("trials",)),
    Case("model-no-module", _search(model="no_such_module:build"), ("no_such_module",)),
    Case("checkpoint-truncated", _checkpoint(_truncated), ("model.pt", "not a readable")),
    Case("imagefolder-corrupt-image", _images(corrupt=True), ("broken.png",)),
    Case("export-unknown-trial", _export("--trial", "99"), ("trial 99",)),
    Case(
        "export-cache-corrupt",
        _export("--trial", "0", before=_corrupt_cache),
        ("cached baseline", "delete"),
    ),
    Case(
        "export-cache-record-garbage",
        _export("--trial", "0", before=_garbage_cache_record),
        (".json", "delete"),
    ),
    Case("export-cache-missing", _export("--trial", "0", before=_missing_cache), ("missing",)),
    Case("export-changed-config", _export("--trial", "0", "--device", "cuda:7"), ("cuda",)),
    Case(
        "report-no-study",
        _on_copy("report", "{study}", "--storage", "sqlite:///{folder}/other.db"),
        ("other.db",),
    ),
    Case(
        "worker-unknown-study",
        _on_copy("worker", "--study", "nope", "--storage", "sqlite:///{folder}/study.db"),
        ("'nope'",),
    ),
    Case(
        "worker-heartbeat",
        _on_copy(
            "worker",
            "--study",
            "tiny",
            "--storage",
            "sqlite:///{folder}/study.db",
            "--heartbeat",
            "0",
        ),
        ("--heartbeat",),
    ),
]


def _ignored(path: Path) -> bool:
    """Files that hold no data: empty lock files (a process that reaches the baseline takes
    its lock), SQLite's ``-shm`` index and an empty ``-wal`` log (a read-only reader of a
    database in WAL mode leaves both behind)."""
    empty = path.stat().st_size == 0
    return path.name.endswith("-shm") or (empty and path.name.endswith((".lock", "-wal")))


def _snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (but :func:`_ignored` ones) by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not _ignored(p)
    }


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]


def _run_all(cases: list[Case], root: Path, study: Path | None) -> dict[str, Ran]:
    """Run every case once, a few processes at a time."""
    code = root / "code"
    code.mkdir()
    (code / "badcode.py").write_text(textwrap.dedent(USER_CODE))
    (code / "brokenimport.py").write_text(BROKEN_IMPORT)
    path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}

    def run(case: Case) -> Ran:
        folder = root / case.id
        folder.mkdir()
        argv = case.build(folder, study)
        before = _snapshot(folder)
        done = subprocess.run(
            [sys.executable, "-m", "autodecomp", *argv],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        return Ran(done.returncode, done.stdout, done.stderr, before, _snapshot(folder))

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip((c.id for c in cases), pool.map(run, cases), strict=True))


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict[str, Ran]:
    return _run_all(CASES, tmp_path_factory.mktemp("bad-input"), None)


@pytest.fixture(scope="module")
def ran_slow(tmp_path_factory) -> dict[str, Ran]:
    root = tmp_path_factory.mktemp("bad-input-slow")
    return _run_all(SLOW_CASES, root, make_study(root / "shared", GOOD, search=True))


def _check(result: Ran, case: Case) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("autodecomp: error: "), lines[0]
    for text in case.expected:
        assert text in lines[0], lines[0]
    changed = sorted(
        name
        for name in result.before.keys() | result.after.keys()
        if result.before.get(name) != result.after.get(name)
    )
    assert changed == [], "files changed"


def test_there_are_at_least_40_cases():
    ids = [c.id for c in CASES + SLOW_CASES]
    assert len(CASES) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(ran, case):
    _check(ran[case.id], case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=[c.id for c in SLOW_CASES])
def test_bad_input_slow(ran_slow, case):
    _check(ran_slow[case.id], case)
