"""Tiny random checkpoints of every native Hugging Face family mmcl supports, saved the way a Hugging Face user
saves them (config + safetensors + tokenizer and processor files, no mmcl metadata). `BUILDERS[model_type](dir)`
writes one and returns its directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tiny_hf.idefics_blip_audio import BUILDERS as _B
from tiny_hf.llava_qwen import BUILDERS as _A

BUILDERS: dict[str, Callable[[Path], Path]] = {**_A, **_B}
