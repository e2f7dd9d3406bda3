"""Tools beside the server: the deployment planner, the serving benchmark and its report,
the shipped default model served by `make serve`, and the tiny random model for tests."""
