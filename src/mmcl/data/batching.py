"""From records to model batches: tokenize once, decode media through a bounded cache, pad, and stack."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmcl.data.records import Record
from mmcl.models.mllm import ModalitySpec
from mmcl.models.tokenizer import ConversationFormat


class MediaLoader:
    """Decodes media files into encoder inputs; keeps the most recent `capacity` decoded items in memory."""

    def __init__(self, specs: dict[str, ModalitySpec], capacity: int = 20000):
        self.specs = specs
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, Path], torch.Tensor] = OrderedDict()
        self._decoders: dict[str, Callable[[Path, ModalitySpec], torch.Tensor]] = {}

    def register(self, modality: str, decoder: Callable[[Path, ModalitySpec], torch.Tensor]) -> None:
        self._decoders[modality] = decoder

    def __call__(self, modality: str, path: Path) -> torch.Tensor:
        key = (modality, path)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if modality not in self.specs:
            raise ValueError(f"the model has no {modality!r} encoder (it reads {sorted(self.specs)}); needed for {path}")
        decoder = self._decoders.get(modality)
        if decoder is None:
            raise ValueError(f"no decoder registered for modality {modality!r}")
        value = decoder(path, self.specs[modality])
        if self.capacity:
            self._cache[key] = value
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return value


@dataclass
class Example:
    """A tokenized record: ids and labels, plus where its media are."""

    id: str
    input_ids: list[int]
    labels: list[int]
    media: dict[str, Path]
    task: str


def encode_records(records: Sequence[Record], fmt: ConversationFormat, task: str, for_generation: bool = False):
    out = []
    for r in records:
        ids, labels = fmt.encode(r.conversations, for_generation=for_generation)
        out.append(Example(r.id, ids, labels, r.media, task))
    return out


class Collator:
    """Pads a list of examples into a batch: right padding for training, left padding for generation."""

    def __init__(self, pad_id: int, media: MediaLoader, left_pad: bool = False, max_length: int | None = None):
        self.pad_id = pad_id
        self.media = media
        self.left_pad = left_pad
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict:
        seqs = [e.input_ids for e in examples]
        labs = [e.labels for e in examples]
        if self.max_length:
            too_long = [e.id for e in examples if len(e.input_ids) > self.max_length]
            if too_long:
                raise ValueError(
                    f"records {too_long[:5]} are {max(len(s) for s in seqs)} tokens, over the model's limit "
                    f"{self.max_length}; shorten them or raise the model's max positions"
                )
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labs)):
            sl = slice(width - len(s), width) if self.left_pad else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            labels[i, sl] = torch.tensor(lab)
            mask[i, sl] = 1
        media: dict[str, torch.Tensor] = {}
        for m in sorted({m for e in examples for m in e.media}):
            media[m] = torch.stack([self.media(m, e.media[m]) for e in examples if m in e.media])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "media": media,
            "ids": [e.id for e in examples],
            "tasks": [e.task for e in examples],
        }


def move_batch(batch: dict, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Tensors to `device`; media also to the model's floating dtype."""
    out = dict(batch)
    for k in ("input_ids", "attention_mask", "labels"):
        out[k] = batch[k].to(device)
    out["media"] = {m: v.to(device=device, dtype=dtype or v.dtype) for m, v in batch["media"].items()}
    return out
