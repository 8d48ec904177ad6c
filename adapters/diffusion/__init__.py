"""The image model on diffusers and PyTorch: the pipeline, batching, GPU tuning and LoRAs.

Imports nothing: ``adapters.diffusion.lora.files`` and ``adapters.diffusion.lora.disk_cache``
(used by the storage adapters and the container) must stay importable without torch.
"""
