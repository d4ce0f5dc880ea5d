"""One entry point for every model directory: choose the backend from what the directory holds.

- `mmcl_model.json`: mmcl's composition (the built-in tiny model, `assemble_model` results);
- `config.json`: the native backend registered for its `model_type` (LLaVA, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
  Idefics3, SmolVLM, BLIP-2, InstructBLIP, Qwen2-Audio); a LLaVA checkpoint can also be mapped onto the
  composition (`backend="composition"`), which gives it the composition's per-modality projectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmcl.models.base import MLLM, ModelLoadError, Processor, backends

BACKEND_CHOICES = ("auto", "native", "composition")


def model_type(path: Path) -> str | None:
    """The `model_type` of a Hugging Face checkpoint directory, "mmcl" for an mmcl model directory, else None."""
    if (path / "mmcl_model.json").is_file():
        return "mmcl"
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ModelLoadError(f"{config}: not a JSON object ({e}); is this a Hugging Face checkpoint?") from e


def supported() -> list[str]:
    """Model types with a backend (plus "mmcl", an mmcl model directory)."""
    return ["mmcl", *sorted(backends())]


def load_backend(path: str | Path, *, backend: str = "auto", dtype: torch.dtype = torch.float32,
                 allow_pickle: bool = False, trust_remote_code: bool = False) -> tuple[MLLM, Processor]:
    """The model and processor of a local directory. Refuses, with one line saying what to do: a missing
    directory, an unknown model type, pickle-only weights (unless `allow_pickle`), remote code (unless
    `trust_remote_code`), missing tokenizer or processor files."""
    from mmcl.models.builder import load_model
    from mmcl.models.composition import composition_processor

    if backend not in BACKEND_CHOICES:
        raise ModelLoadError(f"model.backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(
            f"model path {path} is not a directory: give `tiny`, an mmcl model directory or a local Hugging Face "
            "checkpoint directory (hub ids are not fetched here: download or save the checkpoint first)")
    kind = model_type(path)
    if kind is None:
        raise ModelLoadError(f"{path}: neither mmcl_model.json nor config.json found; is this a model directory?")
    opts = dict(dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if kind == "mmcl" or (kind == "llava" and backend == "composition"):
        model, tokenizer = load_model(path, **opts)
        return model, composition_processor(model, tokenizer)
    if backend == "composition":
        raise ModelLoadError(f"{path}: model_type {kind!r} cannot be mapped onto the composition (only 'llava' can); "
                             "use model.backend=auto")
    loaders = backends()
    if kind not in loaders:
        raise ModelLoadError(f"{path}/config.json: model_type {kind!r} is not supported; supported: "
                             f"{', '.join(supported())}")
    return loaders[kind](path, **opts)
