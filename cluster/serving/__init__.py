"""What callers talk to: the EngineClient contract and the async engine behind it, `LLM`,
the OpenAI-compatible HTTP server, the gRPC `quire.v1.Generate` frontend, metrics, auth."""
