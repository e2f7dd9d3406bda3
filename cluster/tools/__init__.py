"""Tools beside the server: the deployment planner, the serving benchmark and its report,
and the default model built locally for `make serve`."""
