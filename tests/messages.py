"""Queue messages in the shape the backend's code publishes (docs/contract.md, "Queue message")."""

from __future__ import annotations

import uuid
from typing import Any


def backend_message(generation_id: int = 456, **data: Any) -> dict[str, Any]:
    """The backend's message for one generation; ``data`` overrides or adds fields."""
    payload: dict[str, Any] = {
        "generation_id": generation_id,
        "style_id": 123,
        "prompt": "watercolor, portrait, vintage",
        "aspect_ratio": "1:1",
        "seed": 42,
        "prompt_tags": ["watercolor", "portrait", "vintage"],
    }
    payload.update(data)
    return {
        "task_id": str(uuid.uuid4()),
        "type": "image_generation",
        "data": payload,
        "webhook_url": f"https://api.example.com/api/webhooks/generation/{generation_id}/status",
    }
