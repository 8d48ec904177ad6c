"""Adapters: one technology per module, implementing the ports."""
