"""The business of the worker: requests, results, progress, error codes and the use case.

Nothing in this package talks to a network, a GPU or a file system.
"""
