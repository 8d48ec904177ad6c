"""Entry points: the CLI, the worker runtime and logging set-up."""
