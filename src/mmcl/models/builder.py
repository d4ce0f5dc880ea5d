"""Save and load the composition (`MultimodalLM`).

Three ways in, one class out:
- an mmcl model directory (`mmcl_model.json` + one Hugging Face checkpoint per part), as written by `save_model`;
- `assemble_model`: separately saved Hugging Face parts (a causal LM, vision/audio towers) composed into one model;
- a Hugging Face `LlavaForConditionalGeneration` checkpoint directory, mapped part by part onto the composition.
(`mmcl.models.tiny` builds the built-in tiny model; `mmcl.models.loading` chooses a backend for any directory.)
Loading is safetensors-only unless the caller opts in to pickles, and never runs remote code unless asked.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from mmcl.data.media import HOP_LENGTH
from mmcl.models.base import ModelLoadError, refuse_pickles
from mmcl.models.mllm import ModalitySpec, MultimodalLM
from mmcl.models.tokenizer import PLACEHOLDERS, ChatTurns, ensure_placeholders

FORMAT = "mmcl-mllm"


# -- save / load ------------------------------------------------------------------------------------------------------


def write_dir(dest: Path, build: Callable[[Path], None]) -> Path:
    """The one way mmcl writes a model directory: run `build` on an empty directory beside `dest`, then rename it
    to `dest` (replacing an older one); on any failure the partial directory is removed and `dest` is left as it
    was, so an interruption never leaves a half-written model where a run would load it."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.mkdir()
        build(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


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
    index = {
        "format": FORMAT,
        "version": 1,
        "modalities": model.spec_dict(),
        "encoders": {name: type(enc).__name__ for name, enc in model.encoders.items()},
        **({"chat_template": True} if model.chat_template else {}),
        **(extra or {}),
    }
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
        raise ModelLoadError(
            f"{path}/config.json: model_type {cfg.get('model_type')!r} does not map onto the composition (only "
            "'llava' does); load it natively with mmcl.models.loading.load_backend"
        )
    raise FileNotFoundError(f"{path}: neither mmcl_model.json nor config.json found; is this a model directory?")


def _load_mmcl(path: Path, opts: dict) -> tuple[MultimodalLM, PreTrainedTokenizerFast]:
    index = json.loads((path / "mmcl_model.json").read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}/mmcl_model.json: format {index.get('format')!r} is not {FORMAT!r}")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    modalities = {m: ModalitySpec.from_dict(s) for m, s in index["modalities"].items()}
    # encoder name -> class name; directories written before audio/video have no map and load with AutoModel
    classes: dict[str, str | None] = index.get("encoders") or {
        name: None for name in dict.fromkeys(s.encoder or m for m, s in modalities.items())
    }
    for part in [path / "language_model", *[path / "encoders" / name for name in classes]]:
        refuse_pickles(part, not opts["use_safetensors"])
    lm = AutoModelForCausalLM.from_pretrained(path / "language_model", **opts)
    encoders = {name: _load_encoder_dir(path / "encoders" / name, cls, opts) for name, cls in classes.items()}
    token_ids = ensure_placeholders(tokenizer)
    model = MultimodalLM(lm, encoders, modalities, {m: token_ids[m] for m in modalities})
    model.chat_template = bool(index.get("chat_template", False))
    state = load_file(str(path / "projectors.safetensors"))
    for m, proj in model.projectors.items():
        proj.load_state_dict({k[len(m) + 1 :]: v for k, v in state.items() if k.startswith(m + ".")})
    return model.to(opts["dtype"]), tokenizer


def encoder_class(name: str) -> type[PreTrainedModel]:
    """A Hugging Face model class by name, from `transformers` or its Whisper module (where `WhisperEncoder` lives);
    anything else, or a name that is not a `PreTrainedModel` class, is refused (a model file never names code)."""
    from transformers.models.whisper import modeling_whisper

    cls = None
    if isinstance(name, str) and name.isidentifier() and not name.startswith("_"):
        cls = getattr(transformers, name, None) or getattr(modeling_whisper, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(
            f"unknown encoder class {name!r}: it must be a transformers model class (e.g. CLIPVisionModel, "
            "SiglipVisionModel, Dinov2Model, WhisperEncoder)"
        )
    return cls


def _load_encoder_dir(path: Path, class_name: str | None, opts: dict) -> torch.nn.Module:
    if not path.is_dir():
        raise FileNotFoundError(f"encoder directory {path} not found")
    if class_name is None:
        return AutoModel.from_pretrained(path, **opts)
    return encoder_class(class_name).from_pretrained(path, **opts)


def load_encoder(path: str | Path, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> PreTrainedModel:
    """An encoder tower from a local Hugging Face checkpoint directory.

    The class comes from the checkpoint's `architectures` (looked up with `encoder_class`, AutoModel if none is
    named); of an encoder-decoder checkpoint (a `WhisperModel` or `WhisperForConditionalGeneration`) only the encoder
    is kept. Dual encoders such as `CLIPModel` are refused: save their tower (`CLIPVisionModel`) instead.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; give a local Hugging Face checkpoint directory")
    opts = dict(dtype=dtype, use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code)
    refuse_pickles(path, not opts["use_safetensors"])
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    model = _load_encoder_dir(path, archs[0] if archs else None, opts)
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    if hasattr(model, "text_model") and hasattr(model, "vision_model"):
        raise ValueError(
            f"{path} holds a dual encoder ({type(model).__name__}); save its vision tower on its own "
            "(e.g. CLIPVisionModel.from_pretrained(path).save_pretrained(tower_dir)) and give that directory"
        )
    return model


def check_num_tokens(model: MultimodalLM) -> None:
    """Run each modality's encoder on one blank input and check it yields the spec's `num_tokens` features."""
    was_training = model.training
    model.eval()
    try:
        for m, spec in model.modalities.items():
            param = next(model.encoder_for(m).parameters())
            if m == "audio":
                blank = torch.zeros(1, spec.n_mels, spec.seconds * spec.sampling_rate // HOP_LENGTH)
            else:
                blank = torch.zeros(1, 3, spec.image_size, spec.image_size)
                if spec.frames:
                    blank = blank[:, None].expand(1, spec.frames, 3, spec.image_size, spec.image_size)
            try:
                with torch.no_grad():
                    got = model.encoder_features(m, blank.to(param.device, param.dtype)).shape[1]
            except Exception as e:
                raise ValueError(f"{m}: the {type(model.encoder_for(m)).__name__} encoder does not accept the "
                                 f"spec's input {tuple(blank.shape)} ({type(e).__name__}: {e})") from e
            if got != spec.num_tokens:
                raise ValueError(f"{m}: the spec says num_tokens={spec.num_tokens} but the encoder, selection and "
                                 f"pooling give {got} features per item; set num_tokens={got}")
    finally:
        model.train(was_training)


def assemble_model(
    language_model_dir: str | Path,
    encoders: dict[str, str | Path],
    modalities: dict[str, ModalitySpec],
    tokenizer_dir: str | Path | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    chat_template: bool = False,
) -> tuple[MultimodalLM, PreTrainedTokenizerFast]:
    """Compose an MLLM from separately saved Hugging Face parts: a causal LM, encoder towers by name (e.g.
    {"image": clip_dir, "audio": whisper_dir}) and the modality specs (video can read the image tower with
    `encoder="image"`). The projectors are new (seeded by `seed`); the placeholders are added to the tokenizer
    (from `tokenizer_dir`, default the LM's directory) and the LM's embeddings grow to fit. Each spec's
    `num_tokens` is checked against its encoder. With `chat_template`, conversations are written in the
    tokenizer's own chat template (an instruction-tuned LM keeps its format). Save the result with `save_model` to get an mmcl model directory.
    """
    unknown = sorted(set(modalities) - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; mmcl reads {sorted(PLACEHOLDERS)}")
    for m, spec in modalities.items():
        if spec.placeholder != PLACEHOLDERS[m]:
            raise ValueError(
                f"{m}: placeholder must be {PLACEHOLDERS[m]!r} (the records write it), got {spec.placeholder!r}"
            )
    opts = dict(dtype=dtype, use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code)
    lm_dir = Path(language_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(Path(tokenizer_dir) if tokenizer_dir else lm_dir)
    token_ids = ensure_placeholders(tokenizer)
    refuse_pickles(lm_dir, not opts["use_safetensors"])
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, **opts)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    towers = {
        name: load_encoder(d, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        for name, d in encoders.items()
    }
    torch.manual_seed(seed)
    model = MultimodalLM(lm, towers, dict(modalities), {m: token_ids[m] for m in modalities})
    model.to(dtype)
    if chat_template:
        ChatTurns.from_template(tokenizer)  # refuse a template the format cannot follow now, not at the first batch
        model.chat_template = True
    check_num_tokens(model)
    return model, tokenizer


def _load_llava(path: Path, opts: dict) -> tuple[MultimodalLM, PreTrainedTokenizerFast]:
    """Map a `LlavaForConditionalGeneration` checkpoint onto the composition (vision tower, projector, LM)."""
    from transformers import LlavaForConditionalGeneration

    refuse_pickles(path, not opts["use_safetensors"])
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


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


__all__ = [
    "save_model",
    "load_model",
    "load_encoder",
    "assemble_model",
    "check_num_tokens",
    "count_parameters",
]
