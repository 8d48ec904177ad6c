"""Provenance marks: PNG metadata, content credentials and the invisible mark."""
