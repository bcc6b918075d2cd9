"""Shared fixtures: the reference vectors, one prepared corpus and one Slurm cluster per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from slurm_cluster import slurm_fixture  # noqa: F401  (fixture "slurm": one cluster per session)
from train_support import prepare_corpus

REPO = Path(__file__).resolve().parents[1]


def _find_vectors() -> Path | None:
    env = os.environ.get("LAMEMO_REFERENCE_VECTORS")
    for cand in ([Path(env)] if env else []) + [
        REPO / "shared" / "testdata" / "reference-vectors",
        REPO.parent / "shared" / "testdata" / "reference-vectors",
    ]:
        if (cand / "cases.json").is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def reference_vectors() -> Path:
    path = _find_vectors()
    if path is None:
        pytest.fail("reference vectors not found: expected ../shared/testdata/reference-vectors "
                    "beside the checkout or LAMEMO_REFERENCE_VECTORS")
    return path


@pytest.fixture(scope="session")
def reference_cases(reference_vectors) -> dict:
    return json.loads((reference_vectors / "cases.json").read_text())


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The byte-level stdlib corpus the training tests share, prepared once (read-only)."""
    return prepare_corpus(tmp_path_factory.mktemp("corpus") / "stdlib")


@pytest.fixture
def lamemo(capsys) -> Callable[..., subprocess.CompletedProcess]:
    """`lamemo ARGS...` run in this process: exit code, stdout and stderr as the console script
    gives them, without paying a fresh interpreter's torch import (seconds) per call. Only for
    commands that start no process group (tests of launches start real processes)."""
    from lamemo_ds.cli import main

    def run(*argv: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as e:  # what the interpreter does with an uncaught SystemExit
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["lamemo", *argv], code, out.out, out.err)

    return run


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (`-n 2 --dist loadgroup`), each test module runs on one worker so its
    module fixtures run once, and the whole slurm tier on one worker so it shares one cluster."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
