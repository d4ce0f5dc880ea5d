"""The multimodal LLM: modality encoders -> projectors -> any Hugging Face causal LM fed through `inputs_embeds`.

One composition serves every modality and family (design.md, "One model layer for every modality"): the text holds
one placeholder token per feature position (`<image>` repeated `num_tokens` times, likewise `<audio>`, `<video>`),
and the projected features are scattered into those positions before the language model runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from mmcl.models.base import MLLM, Media

# P4's modality cues (" image: " etc.), for models that want them; the tiny model uses them with adapter "p4".
P4_CUES = {"image": " image: ", "audio": " audio: ", "video": " video: "}
POOL_MODES = ("1d", "grid")
PROJECTORS = ("mlp2x_gelu", "linear", "p4")


@dataclass
class ModalitySpec:
    """How one modality reaches the language model: its encoder, which features, and its projector.

    Every field has a default that reproduces an image modality of the first model format, so older
    `mmcl_model.json` files load unchanged. Images feed (N, 3, S, S) pixels; video feeds (N, T, 3, S, S) clips that
    go frame by frame through an image encoder (`encoder="image"`: the weights are shared, as P4 shares one EVA-CLIP)
    and whose per-frame tokens are concatenated in time order; audio feeds (N, n_mels, frames) log-mel features.
    """

    placeholder: str  # text placeholder written in the records, e.g. "<image>"
    num_tokens: int  # feature positions per item after selection and pooling (video: frames x tokens per frame)
    projector: str = "mlp2x_gelu"  # "mlp2x_gelu" (LLaVA-1.5), "linear", or "p4" (LayerNorm, conv pooling, linear)
    feature_layer: int = -1  # hidden-state layer of the encoder to read
    select: str = "patch"  # "patch" drops a leading CLS token, "full" keeps every token
    pool: int = 1  # "1d": average this many consecutive tokens; "grid": average pool x pool windows of the patch grid
    image_size: int = 32  # input resolution for image-like encoders (images and video frames)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    cue: str = ""  # text put before the features (P4's modality cue); empty for LLaVA-style models
    encoder: str | None = None  # name of the encoder in the model's encoders; None = the modality's own name
    frames: int = 0  # video: frames sampled per clip (the input is (N, frames, 3, S, S)); 0 = not a clip
    pool_mode: str = "1d"  # how `pool` averages tokens: "1d" (consecutive) or "grid" (square windows of patches)
    sampling_rate: int = 16000  # audio: waveforms are resampled to this rate (Hz)
    seconds: int = 30  # audio: clips are padded or cut to this many seconds (Whisper: 30; the tiny tower: 1)
    n_mels: int = 80  # audio: log-mel bins

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise ValueError(f"ModalitySpec.projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.pool_mode not in POOL_MODES:
            raise ValueError(f"ModalitySpec.pool_mode must be one of {POOL_MODES}, got {self.pool_mode!r}")
        if self.pool < 1 or self.frames < 0 or self.num_tokens < 1:
            raise ValueError(f"ModalitySpec: pool >= 1, frames >= 0 and num_tokens >= 1 are required, got pool "
                             f"{self.pool}, frames {self.frames}, num_tokens {self.num_tokens}")
        if self.frames and self.num_tokens % self.frames:
            raise ValueError(f"ModalitySpec: num_tokens {self.num_tokens} must be frames ({self.frames}) x tokens "
                             "per frame")

    @classmethod
    def from_dict(cls, data: dict) -> ModalitySpec:
        """A spec from its JSON form; unknown fields are an error naming them (a newer mmcl wrote the file)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown modality spec field(s) {unknown}; known: {sorted(known)} "
                "(was the model saved by a newer mmcl?)"
            )
        return cls(**data)



class P4Adapter(nn.Module):
    """P4's per-modality adapter (X-InstructBLIP projection-only): LayerNorm on the encoder features, a learned conv
    pooling in_dim -> in_dim with kernel = stride = `pool` over each frame's tokens (2-D over the patch grid for
    `pool_mode` "grid", 1-D over consecutive positions for "1d"; none when pool is 1, as for P4's images), and a
    linear map into the language model. Input (N, frames x tokens, D), unpooled; output (N, frames x pooled, out)."""

    pools_tokens = True  # the encoder's features reach it unpooled: its conv does the pooling

    def __init__(self, in_dim: int, out_dim: int, pool: int = 1, pool_mode: str = "1d", frames: int = 0):
        super().__init__()
        self.pool, self.pool_mode, self.frames = pool, pool_mode, max(frames, 1)
        self.norm = nn.LayerNorm(in_dim)
        conv = nn.Conv2d if pool_mode == "grid" else nn.Conv1d
        self.conv_pool = conv(in_dim, in_dim, pool, stride=pool) if pool > 1 else None
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.norm(feats)
        if self.conv_pool is not None:
            n, length, d = x.shape
            x = x.reshape(n * self.frames, length // self.frames, d).transpose(1, 2)  # (N·F, D, T)
            if self.pool_mode == "grid":
                side = math.isqrt(x.shape[-1])
                if side * side != x.shape[-1]:
                    raise ValueError(f"P4 grid pooling needs a square number of tokens per frame, got {x.shape[-1]}")
                x = x.reshape(*x.shape[:2], side, side)
            x = self.conv_pool(x).flatten(2).transpose(1, 2)  # (N·F, pooled, D), row-major like pool_tokens
            x = x.reshape(n, -1, d)
        return self.proj(x)


def build_projector(kind: str, in_dim: int, out_dim: int, spec: ModalitySpec | None = None) -> nn.Module:
    """LLaVA-1.5's two-layer GELU MLP, a single linear map, or P4's adapter (which pools as `spec` says)."""
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "p4":
        s = spec or ModalitySpec("<x>", 1)
        return P4Adapter(in_dim, out_dim, s.pool, s.pool_mode, s.frames)
    raise ValueError(f"unknown projector type {kind!r}: use one of {', '.join(PROJECTORS)}")


def pool_tokens(feats: torch.Tensor, pool: int, mode: str = "1d") -> torch.Tensor:
    """Average-pool (N, T, D) tokens: "1d" averages `pool` consecutive tokens (a trailing remainder is dropped);
    "grid" treats T as a square patch grid and averages pool x pool windows (rows of the grid that do not fill a
    window are dropped), keeping the row-major order."""
    if pool <= 1:
        return feats
    n, t, d = feats.shape
    if mode == "1d":
        return feats[:, : t - t % pool].reshape(n, t // pool, pool, d).mean(2)
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"grid pooling needs a square number of tokens, got {t} (select 'patch' drops a CLS token)")
    grid = feats.transpose(1, 2).reshape(n, d, side, side)
    return nn.functional.avg_pool2d(grid, pool).flatten(2).transpose(1, 2)


def encoder_hidden_size(encoder: nn.Module) -> int:
    cfg = encoder.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model"))


class MultimodalLM(MLLM):
    """Encoders and projectors per modality in front of a causal LM; forward and generate take token ids plus media.

    `encoders` is keyed by encoder name; a modality reads the encoder its spec names (`spec.encoder`), or the one
    of its own name, so several modalities can share one tower (video frames go through the image tower, and the
    tower is one module, not a copy). Each modality has its own projector.

    `language_model` may be a plain `PreTrainedModel` or a PEFT wrapper around one; LoRA and IA3 only ever wrap the
    language model, so the vision tower cannot be adapted by accident.
    """

    family = "mmcl"

    @property
    def capabilities(self) -> frozenset[str]:
        """A separable projector per modality, called by mmcl itself (so it can be replaced by routed experts)."""
        return frozenset({"separable_projector", "routable_projectors"})

    def __init__(
        self,
        language_model: PreTrainedModel,
        encoders: dict[str, nn.Module],
        modalities: dict[str, ModalitySpec],
        token_ids: dict[str, int],
    ) -> None:
        super().__init__()
        self.language_model = language_model
        self.encoders = nn.ModuleDict(encoders)
        self.modalities = modalities
        self.token_ids = dict(token_ids)  # modality -> placeholder token id
        self.chat_template = False  # True: conversations use the tokenizer's own chat template (ChatTurns)
        self.feature_cache = None  # a FeatureCache: frozen encoders' features computed once per media item
        missing = {m: self.encoder_name(m) for m in modalities if self.encoder_name(m) not in self.encoders}
        if missing:
            raise ValueError(
                "modalities without an encoder: "
                + ", ".join(f"{m} reads encoder {e!r}" for m, e in sorted(missing.items()))
                + f"; the encoders are {sorted(self.encoders)}"
            )
        hidden = language_model.get_input_embeddings().embedding_dim
        self.projectors = nn.ModuleDict(
            {
                m: build_projector(s.projector, encoder_hidden_size(self.encoders[self.encoder_name(m)]), hidden, s)
                for m, s in modalities.items()
            }
        )

    def encoder_name(self, modality: str) -> str:
        """Name of the encoder `modality` reads (its spec's `encoder`, else its own name)."""
        return self.modalities[modality].encoder or modality

    def encoder_for(self, modality: str) -> nn.Module:
        return self.encoders[self.encoder_name(modality)]

    # -- features ---------------------------------------------------------------------------------------------------
    def encoder_features(self, modality: str, media: torch.Tensor) -> torch.Tensor:
        """Selected and pooled encoder features before the projector, shape (N, num_tokens, encoder_hidden).

        A video clip batch (N, T, 3, S, S) runs as N*T frames through the encoder; each frame's tokens are selected
        and pooled on their own, then the frames are concatenated in time order. A projector that pools itself
        (`pools_tokens`, P4's adapter) gets them unpooled. With a `feature_cache` (models/feature_cache.py), a
        frozen encoder's features of an item already seen are read back instead of computed.
        """
        if self.feature_cache is None:
            return self._encoder_features(modality, media)
        pools = getattr(self.projectors[modality], "pools_tokens", False)
        extra = f"{modality}|{self.modalities[modality]}|pools_tokens={pools}"
        return self.feature_cache.features(self.encoder_for(modality), media,
                                           lambda items: self._encoder_features(modality, items), extra)

    def _encoder_features(self, modality: str, media: torch.Tensor) -> torch.Tensor:
        spec = self.modalities[modality]
        clips = None
        if spec.frames:
            if media.dim() < 3 or media.shape[1] != spec.frames:
                raise ValueError(
                    f"{modality}: expected clips of shape (N, {spec.frames}, ...), got {tuple(media.shape)}"
                )
            clips = media.shape[:2]
            media = media.reshape(clips[0] * clips[1], *media.shape[2:])
        out = self.encoder_for(modality)(media, output_hidden_states=spec.feature_layer != -1)
        feats = out.last_hidden_state if spec.feature_layer == -1 else out.hidden_states[spec.feature_layer]
        if spec.select == "patch":
            feats = feats[:, 1:]
        if not getattr(self.projectors[modality], "pools_tokens", False):
            feats = pool_tokens(feats, spec.pool, spec.pool_mode)
        if clips is not None:
            feats = feats.reshape(clips[0], clips[1] * feats.shape[1], feats.shape[2])
        return feats

    def encode(self, modality: str, media: torch.Tensor, route_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Features of a batch of media items, shape (N, num_tokens, lm_hidden). A routing projector (EProj's
        experts, `routes`) also gets the token ids of the items' rows."""
        projector = self.projectors[modality]
        feats = self.encoder_features(modality, media)
        if getattr(projector, "routes", False):
            return projector(feats, route_ids=route_ids)
        return projector(feats)

    def embed(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with each modality's placeholder positions replaced by its projected features."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        for modality, values in (media or {}).items():
            if values is None or len(values) == 0:
                continue
            mask = input_ids == self.token_ids[modality]
            feats = self.encode(modality, values, route_ids=input_ids[mask.any(1)]).to(embeds.dtype)
            expected = int(mask.sum())
            if expected != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"{modality}: the batch holds {expected} placeholder tokens but the encoder produced "
                    f"{feats.shape[0]} items x {feats.shape[1]} features; every item needs exactly "
                    f"{self.modalities[modality].num_tokens} placeholder tokens"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
        return embeds

    # -- LM interface ---------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media: dict[str, torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        embeds = self.embed(input_ids, media)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate_new(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 16,
        media: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy decoding with the KV cache from left-padded prompts; returns only the new tokens."""
        embeds = self.embed(input_ids, media)
        kwargs.setdefault("do_sample", False)
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **kwargs
        )

    # -- the seam ---------------------------------------------------------------------------------------------------
    def media_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, Any]:
        """{"media": modality -> the stacked items of the rows that have one, in row order}."""
        out: dict[str, torch.Tensor] = {}
        for m in sorted({m for row in media for m in row}):
            out[m] = torch.stack([row[m]["values"] for row in media if m in row])
        return {"media": out}

    def parts(self) -> dict[str, dict[str, nn.Module]]:
        """Encoders and projectors keyed by the modality they serve (video shares the image tower when its spec
        says so), and the language model."""
        return {
            "encoders": {m: self.encoder_for(m) for m in self.modalities},
            "projectors": {m: self.projectors[m] for m in self.modalities},
            "language_model": {"lm": self.language_model},
        }

    def output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def spec_dict(self) -> dict[str, dict]:
        return {m: asdict(s) for m, s in self.modalities.items()}
