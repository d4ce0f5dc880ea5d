"""The built-in offline world: a deterministic generator of small multimodal and language tasks in LLaVA format."""

from .world import MICL_ORDERS, WorldSizes, world_texts, write_world

__all__ = ["MICL_ORDERS", "WorldSizes", "world_texts", "write_world"]
