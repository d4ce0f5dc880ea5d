"""Test hygiene and shared fixtures: offline, temporary caches, a micro world and a micro base model (built once
per session in a few seconds, from the same code `mmcl pretrain` runs). Shared helpers that are not fixtures live in
support.py; test modules import them from there, never from here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="mmcl-test-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_HOME, "hf")
os.environ["MMCL_HOME"] = os.path.join(_HOME, "mmcl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread is faster than two contending ones (and steadier on a busy 2-core CI machine).
torch.set_num_threads(1)

MICRO_SIZES = dict(train=24, test=8, lang_train=40, align=48, image_size=32)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def micro_world() -> Path:
    """A small built-in world (7 image tasks, 3 language skills) written once per session."""
    from mmcl.data.synth import WorldSizes, write_world

    out = Path(_HOME) / "micro-world"
    write_world(out, seed=0, sizes=WorldSizes(**MICRO_SIZES))
    return out


@pytest.fixture(scope="session")
def micro_model(micro_world) -> Path:
    """A micro base model pre-trained on the micro world by the real `pretrain` (a couple of epochs)."""
    from mmcl.config import TrainConfig
    from mmcl.models.tiny import TinySizes
    from mmcl.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        vocab_size=400,
        vision_steps=60,
        sizes=TinySizes(hidden=32, layers=2, heads=2, intermediate=64, vision_hidden=32, vision_layers=1, image_size=32,
                        video_pool=2),
        language=TrainConfig(epochs=2, batch_size=16, lr=3e-3),
        align=TrainConfig(epochs=1, batch_size=16, lr=3e-3),
    )
    return pretrain(micro_world, Path(_HOME) / "micro-model", cfg, progress=False, log=lambda *a: None)


@pytest.fixture
def micro_overrides(micro_world, micro_model, tmp_path):
    """Overrides that run the micro stream (3 tasks) on the micro model into tmp_path, fast."""
    from support import stream_file

    def make(name: str = "run", tasks: int = 3, **extra) -> list[str]:
        order = ["color_qa", "shape_cls", "count", "ocr", "mcq", "grounding", "caption"]
        o = [
            f"name={name}",
            f"output_dir={tmp_path / name}",
            f"data.stream={micro_world / 'streams' / 'image.yaml'}",
            f"model.path={micro_model}",
            "train.batch_size=8",
            "train.epochs=1",
            "train.lr=1e-3",
            "train.warmup_ratio=0.03",
            "eval.max_new_tokens=6",
        ]
        if tasks < 7:
            o.append(f"data.stream={stream_file(micro_world, order[:tasks], tmp_path)}")
        return o + [f"{k}={v}" for k, v in extra.items()]

    return make


@pytest.fixture(scope="session")
def hf_checkpoints() -> dict[str, Path]:
    """Tiny random checkpoints of every native family (tests/tiny_hf), saved once per session as a user saves them."""
    from tiny_hf import BUILDERS

    root = Path(_HOME) / "hf-checkpoints"
    return {family: build(root / family) for family, build in BUILDERS.items()}


@pytest.fixture
def backend_overrides(micro_world, hf_checkpoints, tmp_path):
    """Overrides that put a run of `micro_overrides` on another backend: its tiny checkpoint, and for a family that
    reads only audio, the micro world's audio tasks instead of the image ones."""
    from support import AUDIO_TASKS, stream_file

    def make(backend: str, tasks: int = 2) -> list[str]:
        if backend == "mmcl":
            return []
        out = [f"model.path={hf_checkpoints[backend]}"]
        if backend == "qwen2_audio":
            out.append(f"data.stream={stream_file(micro_world, AUDIO_TASKS[:tasks], tmp_path, 'audio')}")
        return out

    return make


@pytest.fixture
def probe():
    """Register the test-only probe strategy (support.Probe) for one test, with the plan it follows, and remove it
    afterwards: it is never registered at import, so the registry-wide contract test does not see it."""
    from support import PROBE, Probe

    from mmcl.strategies.registry import _REGISTRY, register_strategy

    Probe.plan, Probe.instances = {}, []
    register_strategy(PROBE)(Probe)
    yield Probe
    _REGISTRY.pop(PROBE, None)
    Probe.plan, Probe.instances = {}, []
