"""Build, save and load the multimodal LLM.

Three ways in, one class out (`MultimodalLM`):
- `build_tiny`: the built-in tiny model (CLIP-style vision tower + Llama), random weights, for `mmcl pretrain`;
- an mmcl model directory (`mmcl_model.json` + one Hugging Face checkpoint per part), as written by `save_model`;
- a Hugging Face `LlavaForConditionalGeneration` checkpoint directory, mapped part by part onto the composition.
Loading is safetensors-only unless the caller opts in to pickles, and never runs remote code unless asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from mmcl.models.mllm import ModalitySpec, MultimodalLM
from mmcl.models.tokenizer import ConversationFormat, ensure_placeholders

FORMAT = "mmcl-mllm"


@dataclass
class TinySizes:
    """Sizes of the built-in tiny model; the defaults train at ~10 steps/s on 2 CPU cores (batch 16)."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    max_positions: int = 256


def build_tiny(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes | None = None, seed: int = 0) -> MultimodalLM:
    """A freshly initialised tiny MLLM of real HF classes (CLIPVisionModel + LlamaForCausalLM)."""
    s = sizes or TinySizes()
    token_ids = ensure_placeholders(tokenizer)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=s.hidden,
            intermediate_size=s.intermediate,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.heads,
            max_position_embeddings=s.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
    )
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=s.vision_hidden,
            intermediate_size=2 * s.vision_hidden,
            num_hidden_layers=s.vision_layers,
            num_attention_heads=4,
            image_size=s.image_size,
            patch_size=s.patch_size,
        )
    )
    spec = ModalitySpec("<image>", num_tokens=(s.image_size // s.patch_size) ** 2, image_size=s.image_size)
    return MultimodalLM(lm, {"image": vision}, {"image": spec}, {"image": token_ids["image"]})


# -- save / load ------------------------------------------------------------------------------------------------------


def save_model(model: MultimodalLM, tokenizer: PreTrainedTokenizerFast, path: Path, extra: dict | None = None) -> None:
    """Write an mmcl model directory: one HF checkpoint per part, projectors in safetensors, a JSON index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm = model.language_model
    if hasattr(lm, "merge_and_unload"):
        raise ValueError("save_model expects a plain language model; merge or unload the PEFT adapter first")
    lm.save_pretrained(path / "language_model")
    for name, enc in model.encoders.items():
        enc.save_pretrained(path / "encoders" / name)
    tensors = {f"{m}.{k}": v.detach().contiguous() for m, p in model.projectors.items() for k, v in p.state_dict().items()}
    save_file(tensors, str(path / "projectors.safetensors"))
    tokenizer.save_pretrained(path / "tokenizer")
    index = {"format": FORMAT, "version": 1, "modalities": model.spec_dict(), **(extra or {})}
    (path / "mmcl_model.json").write_text(json.dumps(index, indent=2) + "\n")


def load_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False, trust_remote_code: bool = False
) -> tuple[MultimodalLM, PreTrainedTokenizerFast]:
    """Load an mmcl model directory or a LLaVA checkpoint directory (safetensors only unless `allow_pickle`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model path {path} is not a directory: give an mmcl model directory (from `mmcl pretrain`) or a local "
            "Hugging Face LLaVA checkpoint directory (hub ids are not fetched: download the checkpoint first)"
        )
    opts = dict(dtype=dtype, use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code)
    if (path / "mmcl_model.json").exists():
        return _load_mmcl(path, opts)
    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("model_type") == "llava":
            return _load_llava(path, opts)
        raise ValueError(
            f"{path}/config.json: model_type {cfg.get('model_type')!r} is not supported yet; supported: an mmcl "
            "model directory, or a LLaVA (model_type 'llava') checkpoint"
        )
    raise FileNotFoundError(f"{path}: neither mmcl_model.json nor config.json found; is this a model directory?")


def _refuse_pickles(path: Path, opts: dict) -> None:
    if opts["use_safetensors"]:
        pickles = [p.name for p in path.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
        if pickles and not list(path.glob("*.safetensors")):
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(sorted(pickles))}); loading a pickle can run code. "
                "Convert them to safetensors, or opt in with model.allow_pickle=true if you trust the source"
            )


def _load_mmcl(path: Path, opts: dict) -> tuple[MultimodalLM, PreTrainedTokenizerFast]:
    index = json.loads((path / "mmcl_model.json").read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}/mmcl_model.json: format {index.get('format')!r} is not {FORMAT!r}")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    for part in [path / "language_model", *[path / "encoders" / m for m in index["modalities"]]]:
        _refuse_pickles(part, opts)
    lm = AutoModelForCausalLM.from_pretrained(path / "language_model", **opts)
    modalities = {m: ModalitySpec(**s) for m, s in index["modalities"].items()}
    encoders = {m: AutoModel.from_pretrained(path / "encoders" / m, **opts) for m in modalities}
    token_ids = ensure_placeholders(tokenizer)
    model = MultimodalLM(lm, encoders, modalities, {m: token_ids[m] for m in modalities})
    state = load_file(str(path / "projectors.safetensors"))
    for m, proj in model.projectors.items():
        proj.load_state_dict({k[len(m) + 1 :]: v for k, v in state.items() if k.startswith(m + ".")})
    return model.to(opts["dtype"]), tokenizer


def _load_llava(path: Path, opts: dict) -> tuple[MultimodalLM, PreTrainedTokenizerFast]:
    """Map a `LlavaForConditionalGeneration` checkpoint onto the composition (vision tower, projector, LM)."""
    from transformers import LlavaForConditionalGeneration

    _refuse_pickles(path, opts)
    llava = LlavaForConditionalGeneration.from_pretrained(path, **opts)
    cfg = llava.config
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_config(cfg.text_config, dtype=opts["dtype"])
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    vision = llava.model.vision_tower
    vcfg = cfg.vision_config
    n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    select = "patch" if cfg.vision_feature_select_strategy == "default" else "full"
    layer = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer[-1]
    spec = ModalitySpec("<image>", n_patches + (select == "full"), "mlp2x_gelu", layer, select, 1, vcfg.image_size)
    token_ids = ensure_placeholders(tokenizer)
    if cfg.image_token_index is not None and cfg.image_token_index < len(tokenizer):
        token_ids["image"] = cfg.image_token_index
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    model = MultimodalLM(lm, {"image": vision}, {"image": spec}, {"image": token_ids["image"]})
    src = llava.model.multi_modal_projector
    proj = model.projectors["image"]
    proj[0].load_state_dict(src.linear_1.state_dict())
    proj[2].load_state_dict(src.linear_2.state_dict())
    return model.to(opts["dtype"]), tokenizer


# -- inputs -----------------------------------------------------------------------------------------------------------


def load_image(path: Path, spec: ModalitySpec) -> torch.Tensor:
    """Decode an image file into a normalised (3, S, S) tensor (squashed to the tower's resolution)."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((spec.image_size, spec.image_size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def media_loader(model: MultimodalLM, capacity: int = 20000):
    """A media loader with a decoder for each modality the model reads (image files -> normalised tensors)."""
    from mmcl.data.batching import MediaLoader

    media = MediaLoader(model.modalities, capacity)
    decoders = {"image": load_image}
    for modality in model.modalities:
        if modality in decoders:
            media.register(modality, decoders[modality])
    return media


def conversation_format(model: MultimodalLM, tokenizer: PreTrainedTokenizerFast) -> ConversationFormat:
    return ConversationFormat(
        tokenizer,
        {m: s.num_tokens for m, s in model.modalities.items()},
        {m: s.cue for m, s in model.modalities.items()},
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


__all__ = [
    "TinySizes",
    "build_tiny",
    "save_model",
    "load_model",
    "load_image",
    "media_loader",
    "conversation_format",
    "count_parameters",
]
