"""The quire controller: scheduler, KV block tables, engine, executors and frontends.

`from quire.cluster import LLM, SamplingParams, EngineConfig, RequestOutput, CompletionOutput`
works as ever, but each name is imported on first use (PEP 562): importing the package, or a
light module in it (`quire.cluster.cli`, the planner, the benchmark), loads no engine, torch
or transformers."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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
