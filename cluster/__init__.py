"""The quire controller: scheduler, KV block tables, engine, executors and frontends."""
from quire.cluster.config import EngineConfig
from quire.cluster.llm import LLM
from quire.cluster.outputs import CompletionOutput, RequestOutput
from quire.protos.step import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
