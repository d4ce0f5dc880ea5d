"""Native Hugging Face VLM backends: importing this package registers every family and `load_native` as the backend
of each family's model types."""

from __future__ import annotations

from mmcl.models.hf import families_llava_qwen  # noqa: F401  (registers llava, llava_onevision, qwen2_vl, qwen2_5_vl)
from mmcl.models.hf.native import NativeProcessor, NativeVLM, load_native, register_native_backends

try:
    import mmcl.models.hf.families_idefics_blip_audio  # noqa: F401
except ModuleNotFoundError as e:  # that module is optional while it is being written; nothing else may be missing
    if e.name != "mmcl.models.hf.families_idefics_blip_audio":
        raise

register_native_backends()

__all__ = ["NativeProcessor", "NativeVLM", "load_native"]
