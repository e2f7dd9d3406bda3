"""The controller core: requests, the block pool and KV cache manager, the scheduler, the
engine that steps them with an executor, detokenising and outputs. Imports no frontend."""
