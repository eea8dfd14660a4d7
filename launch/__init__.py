"""STARTING A RUN: the `guidedmix` CLI, the Ray driver, and the local cluster behind the default."""
