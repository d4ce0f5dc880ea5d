"""Frozen encoders cost nothing twice: each media item's encoder features are computed once and kept on disk.

An item's key is a hash of the encoder's weights (its fingerprint) and of the item's decoded input tensor, which
mmcl's decoders produce deterministically from the file's content and the modality spec (resolution,
normalisation, frames, seconds) — so a changed file, a changed spec or changed weights each miss the cache. The
fingerprint is recomputed only when a weight tensor was modified in place or replaced (torch's per-tensor version
counters), so a frozen tower is hashed once per run. The cache applies only while the encoder is frozen (no
parameter requires a gradient) and deterministic (no active dropout); otherwise the encoder runs as usual.
Files are safetensors, one per item, written beside their final name and renamed (a crash leaves no partial file).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _is_frozen_and_deterministic(encoder: torch.nn.Module) -> bool:
    if any(p.requires_grad for p in encoder.parameters()):
        return False
    if encoder.training:
        return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in encoder.modules())
    return True


class FeatureCache:
    """Encoder features per media item under `root`, with a bounded in-memory copy of what this process read."""

    def __init__(self, root: str | Path, memory_bytes: int = 512 * 2**20) -> None:
        self.root = Path(root)
        self.memory_bytes = memory_bytes
        self._memory: dict[str, torch.Tensor] = {}
        self._held = 0
        self._fingerprints: dict[int, tuple[tuple, str]] = {}
        self.hits = self.misses = 0

    def fingerprint(self, encoder: torch.nn.Module, extra: str = "") -> str:
        """A hash of the encoder's class, parameter names, dtypes and values (and `extra`, e.g. the feature layer)."""
        state = tuple((name, p.data_ptr(), p._version) for name, p in encoder.named_parameters())
        known = self._fingerprints.get(id(encoder))
        if known and known[0] == (state, extra):
            return known[1]
        h = hashlib.sha256(f"{type(encoder).__name__}|{extra}".encode())
        for name, p in encoder.named_parameters():
            t = p.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digest = h.hexdigest()[:32]
        self._fingerprints[id(encoder)] = ((state, extra), digest)
        return digest

    @staticmethod
    def item_key(fingerprint: str, item: torch.Tensor) -> str:
        t = item.detach().cpu().contiguous()
        h = hashlib.sha256(f"{fingerprint}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _path(self, fingerprint: str, key: str) -> Path:
        return self.root / fingerprint / key[:2] / f"{key}.safetensors"

    def _remember(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self._held + size <= self.memory_bytes:
            self._memory[key] = value
            self._held += size

    def get(self, fingerprint: str, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        path = self._path(fingerprint, key)
        if not path.is_file():
            return None
        try:
            value = load_file(str(path))["features"]
        except Exception:  # an unreadable entry is a miss; it is rewritten
            return None
        self._remember(key, value)
        return value

    def put(self, fingerprint: str, key: str, value: torch.Tensor) -> None:
        value = value.detach().cpu().contiguous()
        self._remember(key, value)
        path = self._path(fingerprint, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"features": value}, str(tmp))
        os.replace(tmp, path)

    def features(self, encoder: torch.nn.Module, items: torch.Tensor, compute, extra: str = "") -> torch.Tensor:
        """Features of a batch of items (N, ...): cached ones read back, the others computed by `compute(items)`
        in one call and stored. Falls back to `compute(items)` when the encoder is not frozen and deterministic."""
        if not _is_frozen_and_deterministic(encoder):
            return compute(items)
        fp = self.fingerprint(encoder, extra)
        keys = [self.item_key(fp, item) for item in items]
        found = [self.get(fp, k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            with torch.no_grad():
                fresh = compute(items[todo])
            for i, value in zip(todo, fresh):
                self.put(fp, keys[i], value)
                found[i] = value.detach().cpu()
        return torch.stack(found).to(items.device)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.safetensors")) if self.root.exists() else 0


AUTO_MIN_PARAMETERS = 5_000_000
"""`feature_cache=auto` caches an encoder of at least this many parameters (below it, the tiny built-in towers, the
forward is cheaper than hashing the input and reading a file)."""


def attach_feature_cache(model, mode: str, root: Path) -> list[str]:
    """Give a composition model a FeatureCache per `mode` (auto, always, never); returns the encoders it will cache (only
    while each is frozen). `always` for a model that cannot cache (a native backend) is a ValueError naming why."""
    encoders = getattr(model, "encoders", None)
    if mode == "never" and hasattr(model, "feature_cache"):
        model.feature_cache = None
    if mode == "never" or encoders is None or not hasattr(model, "feature_cache"):
        if mode == "always":
            raise ValueError("model.feature_cache=always needs the composition backend (an mmcl model directory); "
                             "native Hugging Face backends run their own towers: use auto or never")
        return []
    frozen = [n for n, e in encoders.items() if not any(p.requires_grad for p in e.parameters())]
    if mode == "auto":
        frozen = [n for n in frozen if sum(p.numel() for p in encoders[n].parameters()) >= AUTO_MIN_PARAMETERS]
    model.feature_cache = FeatureCache(root) if frozen else None
    return frozen
