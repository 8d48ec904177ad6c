"""Fixtures of the worker's integration tests (the stack: queue, buckets, backend)."""

from tests.integration.worker_stack import stack, worker_env

__all__ = ["stack", "worker_env"]
