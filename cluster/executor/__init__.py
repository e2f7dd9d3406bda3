"""How step plans reach the workers: the executor contract, the in-process executor, the
gRPC executor, and the launchers that start worker processes (locally or as Ray actors)."""
