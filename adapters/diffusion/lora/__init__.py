"""LoRAs of the diffusion model: file rules, validation, parsing, routing, pipeline LoRAs, cache.

Imports nothing: ``files`` and ``disk_cache`` must stay importable without torch.
"""
