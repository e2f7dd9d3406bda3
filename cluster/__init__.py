"""The quire controller: scheduler, KV block tables, engine, executors and frontends."""
from quire.cluster.core.config import EngineConfig
from quire.cluster.serving.llm import LLM
from quire.cluster.core.outputs import CompletionOutput, RequestOutput
from quire.protos.step import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
