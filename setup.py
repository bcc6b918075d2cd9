"""Build hook: ship the run configs in the wheel (metadata and everything else: pyproject.toml).

The YAML configs live in the top-level configs/ (where the README, slurm/ and tests use them);
building the package copies them into lamemo_ds/configs/ inside the build, so an installed
lamemo_ds finds them by name (`lamemo model-info --config enwik8_base`, config.load).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "lamemo_ds" / "configs"
        dest.mkdir(parents=True, exist_ok=True)
        for yaml_file in sorted((HERE / "configs").glob("*.yaml")):
            shutil.copyfile(yaml_file, dest / yaml_file.name)


setup(cmdclass={"build_py": BuildPyWithConfigs})
