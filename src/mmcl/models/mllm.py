"""The multimodal LLM: modality encoders -> projectors -> any Hugging Face causal LM fed through `inputs_embeds`.

One composition serves every modality and family (design.md, "One model layer for every modality"): the text holds
one placeholder token per feature position (`<image>` repeated `num_tokens` times, likewise `<audio>`, `<video>`),
and the projected features are scattered into those positions before the language model runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass
class ModalitySpec:
    """How one modality reaches the language model: its encoder, which features, and its projector."""

    placeholder: str  # text placeholder written in the records, e.g. "<image>"
    num_tokens: int  # feature positions per item after selection and pooling
    projector: str = "mlp2x_gelu"  # "mlp2x_gelu" (LLaVA-1.5) or "linear"
    feature_layer: int = -1  # hidden-state layer of the encoder to read
    select: str = "patch"  # "patch" drops a leading CLS token, "full" keeps every token
    pool: int = 1  # average-pool this many consecutive tokens into one (1 = none)
    image_size: int = 32  # input resolution for image-like encoders
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    cue: str = ""  # text put before the features (P4's modality cue); empty for LLaVA-style models


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1.5's two-layer GELU MLP or a single linear map (P4)."""
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"unknown projector type {kind!r}: use 'mlp2x_gelu' or 'linear'")


def encoder_hidden_size(encoder: nn.Module) -> int:
    cfg = encoder.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model"))


class MultimodalLM(nn.Module):
    """Encoders and projectors per modality in front of a causal LM; forward and generate take token ids plus media.

    `language_model` may be a plain `PreTrainedModel` or a PEFT wrapper around one; LoRA and IA3 only ever wrap the
    language model, so the vision tower cannot be adapted by accident.
    """

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
        hidden = language_model.get_input_embeddings().embedding_dim
        self.projectors = nn.ModuleDict(
            {m: build_projector(s.projector, encoder_hidden_size(encoders[m]), hidden) for m, s in modalities.items()}
        )

    # -- features ---------------------------------------------------------------------------------------------------
    def encode(self, modality: str, media: torch.Tensor) -> torch.Tensor:
        """Features of a batch of media items, shape (N, num_tokens, lm_hidden)."""
        spec = self.modalities[modality]
        enc = self.encoders[modality]
        out = enc(media, output_hidden_states=spec.feature_layer != -1)
        feats = out.last_hidden_state if spec.feature_layer == -1 else out.hidden_states[spec.feature_layer]
        if spec.select == "patch":
            feats = feats[:, 1:]
        if spec.pool > 1:
            n, t, d = feats.shape
            feats = feats[:, : t - t % spec.pool].reshape(n, t // spec.pool, spec.pool, d).mean(2)
        return self.projectors[modality](feats)

    def embed(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with each modality's placeholder positions replaced by its projected features."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        for modality, values in (media or {}).items():
            if values is None or len(values) == 0:
                continue
            feats = self.encode(modality, values).to(embeds.dtype)
            mask = input_ids == self.token_ids[modality]
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
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: dict[str, torch.Tensor] | None = None,
        max_new_tokens: int = 16,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy decoding with the KV cache from left-padded prompts; returns only the new tokens."""
        embeds = self.embed(input_ids, media)
        kwargs.setdefault("do_sample", False)
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **kwargs
        )

    def spec_dict(self) -> dict[str, dict]:
        return {m: asdict(s) for m, s in self.modalities.items()}
