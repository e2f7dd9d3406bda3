"""The package list follows the folders: every package under the four top-level folders
ships as a subpackage of `quire` (`cluster/core` is `quire.cluster.core`). Metadata is in
pyproject.toml."""
from setuptools import find_packages, setup

TOP_LEVEL = ["cluster", "worker", "kernels", "protos"]

setup(
    packages=[f"quire.{name}" for name in find_packages(include=[*TOP_LEVEL, *(f"{top}.*" for top in TOP_LEVEL)])],
    package_dir={f"quire.{top}": top for top in TOP_LEVEL},
)
