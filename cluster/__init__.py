"""The quire controller: scheduler, KV block tables, engine, executors and frontends.

`from quire.cluster import LLM, SamplingParams, EngineConfig, RequestOutput, CompletionOutput`
works as ever, but each name is imported on first use (PEP 562): importing the package, or a
light module in it (`quire.cluster.cli`, the planner, the benchmark), loads no engine, torch
or transformers."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING


def _unshadow_checkout() -> None:
    """Drop a quire checkout's root from sys.path. Installed editable, quire's folders are
    its sub-packages (quire.kernels is <checkout>/kernels); but a process whose sys.path
    holds the checkout itself (`python -m` run there, or a Ray worker, to which Ray hands its
    driver's directory) would also import them as top-level packages, shadowing installed
    ones of the same name: transformers imports a `kernels` package. An installed wheel
    (quire/ in site-packages) leaves sys.path alone."""
    checkout = Path(__file__).resolve().parent.parent
    if checkout.name != "quire" and (checkout / "kernels" / "__init__.py").is_file():
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != checkout]


_unshadow_checkout()

_EXPORTS = {  # public name -> the module defining it
    "LLM": "quire.cluster.serving.llm",
    "SamplingParams": "quire.protos.step",
    "EngineConfig": "quire.cluster.core.config",
    "RequestOutput": "quire.cluster.core.outputs",
    "CompletionOutput": "quire.cluster.core.outputs",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports these
    from quire.cluster.core.config import EngineConfig
    from quire.cluster.core.outputs import CompletionOutput, RequestOutput
    from quire.cluster.serving.llm import LLM
    from quire.protos.step import SamplingParams


def __getattr__(name: str):
    if name not in _EXPORTS:
        # AttributeError (not ImportError) lets `from quire.cluster import cli` fall back to the submodule.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
