"""Shared fixtures: the reference vectors beside the checkout, and small model configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
