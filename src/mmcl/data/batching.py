"""From records to model batches: tokenize once (one placeholder token per media item), decode media through a
bounded cache, expand each placeholder into the item's own tokens, pad, and keep per-row media so a batch can be
cut (`select`) and joined (`concat`) by replay, pseudo targets and distillation."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmcl.data.records import Record

if TYPE_CHECKING:
    from mmcl.models.base import MediaItem, Processor


class MediaLoader:
    """Decodes media files through the processor; keeps the most recent `capacity` decoded items in memory."""

    def __init__(self, processor: Processor, capacity: int = 20000):
        self.processor = processor
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, Path], MediaItem] = OrderedDict()

    def __call__(self, modality: str, path: Path) -> MediaItem:
        key = (modality, Path(path))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if modality not in self.processor.modalities:
            raise ValueError(f"the model reads {sorted(self.processor.modalities)}, not {modality!r}; needed for {path}")
        # decoding is data preparation, never mixed precision: a run's autocast (bf16 scoring) must not reach a
        # processor's own tensor maths (Whisper's log-mel ends in .numpy(), which has no bf16)
        with torch.autocast("cpu", enabled=False):
            value = self.processor.load_media(modality, Path(path))
        if self.capacity:
            self._cache[key] = value
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return value


@dataclass
class Example:
    """A tokenized record: ids and labels with one placeholder token per media item, plus where its media are."""

    id: str
    input_ids: list[int]
    labels: list[int]
    media: dict[str, Path]
    task: str


def encode_records(records: Sequence[Record], processor: Processor, task: str, for_generation: bool = False):
    out = []
    for r in records:
        ids, labels = processor.encode(r.conversations, for_generation=for_generation)
        out.append(Example(r.id, ids, labels, r.media, task))
    return out


@dataclass
class Batch:
    """Padded token ids, mask and labels of B rows, each row's media inputs (modality -> tensors; {} for a text-only
    row), and the rows' record ids and task names."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    media: list[dict[str, dict[str, torch.Tensor]]]
    ids: list[str]
    tasks: list[str]
    left_pad: bool = False
    extra: dict = field(default_factory=dict)
    """Strategy annotations that travel with the batch (not model inputs)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Sequence[int]) -> Batch:
        """The sub-batch of `rows` (in that order), media of exactly those rows; the width is kept."""
        index = torch.tensor(list(rows), device=self.input_ids.device, dtype=torch.long)
        return replace(self, input_ids=self.input_ids.index_select(0, index),
                       attention_mask=self.attention_mask.index_select(0, index),
                       labels=self.labels.index_select(0, index), media=[self.media[r] for r in rows],
                       ids=[self.ids[r] for r in rows], tasks=[self.tasks[r] for r in rows], extra=dict(self.extra))

    def widen(self, width: int, pad_id: int) -> Batch:
        """Padded to `width` columns on the padding side (right for training, left for generation)."""
        extra = width - self.input_ids.shape[1]
        if extra <= 0:
            return self
        pad = (extra, 0) if self.left_pad else (0, extra)
        f = torch.nn.functional.pad
        return replace(self, input_ids=f(self.input_ids, pad, value=pad_id), attention_mask=f(self.attention_mask, pad),
                       labels=f(self.labels, pad, value=-100))

    @staticmethod
    def concat(batches: Sequence[Batch], pad_id: int, width: int = 0) -> Batch:
        """Rows of every batch in order, padded to a common width (at least `width`)."""
        width = max([width, *(b.input_ids.shape[1] for b in batches)])
        wide = [b.widen(width, pad_id) for b in batches]
        extra: dict = {}
        for b in batches:
            extra.update(b.extra)
        return Batch(torch.cat([b.input_ids for b in wide]), torch.cat([b.attention_mask for b in wide]),
                     torch.cat([b.labels for b in wide]), [m for b in wide for m in b.media],
                     [i for b in wide for i in b.ids], [t for b in wide for t in b.tasks], batches[0].left_pad, extra)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
        """Tensors to `device`; floating media tensors also to `dtype` (the model's)."""

        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)

        media = [{m: {k: move(v) for k, v in item.items()} for m, item in row.items()} for row in self.media]
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       labels=self.labels.to(device), media=media)


class Collator:
    """Examples into a `Batch`: placeholders expanded into each item's tokens, right padding for training, left
    padding for generation."""

    def __init__(self, processor: Processor, media: MediaLoader, left_pad: bool = False, max_length: int | None = None):
        self.processor = processor
        self.pad_id = processor.pad_id
        self.media = media
        self.left_pad = left_pad
        self.max_length = max_length

    def expand(self, example: Example) -> tuple[list[int], list[int], dict[str, dict[str, torch.Tensor]]]:
        """The example's ids and labels with each media placeholder replaced by its item's tokens (label -100)."""
        ids, labels = example.input_ids, example.labels
        row: dict[str, dict[str, torch.Tensor]] = {}
        for modality in sorted(example.media):
            item = self.media(modality, example.media[modality])
            pid = self.processor.placeholder_id(modality)
            if pid not in ids:
                raise ValueError(f"record {example.id}: has a {modality} file but no {modality} placeholder in its text")
            at = ids.index(pid)
            ids = ids[:at] + item.tokens + ids[at + 1 :]
            labels = labels[:at] + [-100] * len(item.tokens) + labels[at + 1 :]
            row[modality] = item.inputs
        return ids, labels, row

    def __call__(self, examples: Sequence[Example]) -> Batch:
        expanded = [self.expand(e) for e in examples]
        seqs = [x[0] for x in expanded]
        if self.max_length:
            too_long = [e.id for e, s in zip(examples, seqs) if len(s) > self.max_length]
            if too_long:
                raise ValueError(
                    f"records {too_long[:5]} are {max(len(s) for s in seqs)} tokens, over the model's limit "
                    f"{self.max_length}; shorten them or raise the model's max positions"
                )
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lab, _) in enumerate(expanded):
            sl = slice(width - len(s), width) if self.left_pad else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            labels[i, sl] = torch.tensor(lab)
            mask[i, sl] = 1
        return Batch(ids, mask, labels, [x[2] for x in expanded], [e.id for e in examples],
                     [e.task for e in examples], self.left_pad)
