"""The vision-language family: the LLM family's deployment and model over ``VLMEngine``.

Same pool, same continuous batch per loaded model, same ``generate`` the chat, Responses
and Messages routes call; what differs is how a model is found (an mlx-vlm directory),
which engine runs it, and that a conversation's image parts become image spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import serve

from deployments.llm import GenerativeFamily, LLMModel
from mlx_orchard.config import VLMEntry
from mlx_orchard.engines.vlm import VLMEngine
from mlx_orchard.models.registry import resolve_directory


class VLMModel(LLMModel):
    """One loaded vision-language model."""

    family = "vlm"
    engine: VLMEngine

    def make_engine(self, entry: VLMEntry, path: Path, **options: Any) -> VLMEngine:  # type: ignore[override]
        return VLMEngine(
            path,
            **options,
            image_cache_size=entry.image_cache_size,
            image_cache_bytes=int(entry.image_cache_mb * (1 << 20)),
        )

    def encode_messages(self, messages: list[dict[str, Any]], images: list[Any], **template_kwargs: Any
                        ) -> tuple[list[int], Sequence[Any]]:
        return self.engine.encode_vision_chat(messages, images, **template_kwargs)


@serve.deployment(name="vlm", max_ongoing_requests=64, health_check_period_s=10)
class VLMDeployment(GenerativeFamily):
    """The vision-language pool (mlx-vlm models)."""

    model_class = VLMModel

    def resolve(self, entry: VLMEntry) -> Path:  # type: ignore[override]
        return resolve_directory(entry.source)
