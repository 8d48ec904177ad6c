"""Adapters: the ports implemented, one technology per module or package."""
