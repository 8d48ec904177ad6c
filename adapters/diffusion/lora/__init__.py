"""LoRAs for the diffusion model: file rules, validation, parsing, routing, pipeline LoRAs and
the disk cache.

Imports nothing: ``files`` and ``disk_cache`` must stay importable without torch.
"""
