"""The shipped run configs: loadable by name from a checkout, and inside a wheel built with
`pip wheel .`, where `lamemo model-info --config enwik8_base` works from the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lamemo_ds.config.load import bundled_configs, load_config
from lamemo_ds.config.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.unit
def test_configs_load_by_name():
    assert sorted(bundled_configs()) == CONFIGS and "enwik8_base" in CONFIGS
    by_file = load_config(REPO / "configs" / "enwik8_base.yaml")
    assert load_config("enwik8_base") == by_file == load_config("enwik8_base.yaml")
    with pytest.raises(ConfigError, match="'enwik9'.*enwik8_base"):
        load_config("enwik9")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("some/dir/enwik8_base.yaml")  # a path is a path, never a shipped name


@pytest.mark.integration
@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", ".pytest_cache", "tests", "bench"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist")], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lamemo_ds-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("lamemo_ds/configs/")) == [
        f"lamemo_ds/configs/{c}.yaml" for c in CONFIGS]
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-m", "lamemo_ds.cli", "model-info", "--config",
                        "enwik8_base"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "41,083,137" in r.stdout  # the enwik8 reference shape, read from the wheel's copy
    where = subprocess.run([sys.executable, "-c", "import lamemo_ds; print(lamemo_ds.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(site))  # the installed wheel, not the checkout
