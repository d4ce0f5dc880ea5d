"""Test hygiene and shared fixtures: offline, temporary caches, a micro world and a micro base model (built once
per session in a few seconds, from the same code `mmcl pretrain` runs)."""

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
        sizes=TinySizes(hidden=32, layers=2, heads=2, intermediate=64, vision_hidden=32, vision_layers=1),
        language=TrainConfig(epochs=2, batch_size=16, lr=3e-3),
        align=TrainConfig(epochs=1, batch_size=16, lr=3e-3),
    )
    return pretrain(micro_world, Path(_HOME) / "micro-model", cfg, progress=False, log=lambda *a: None)


@pytest.fixture
def micro_overrides(micro_world, micro_model, tmp_path):
    """Overrides that run the micro stream (3 tasks) on the micro model into tmp_path, fast."""

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
            o.append(f"data.stream={_sub_stream(micro_world, order[:tasks], tmp_path)}")
        return o + [f"{k}={v}" for k, v in extra.items()]

    return make


@pytest.fixture(scope="session")
def hf_checkpoints() -> dict[str, Path]:
    """Tiny random checkpoints of every native family (tests/tiny_hf), saved once per session as a user saves them."""
    from tiny_hf import BUILDERS

    root = Path(_HOME) / "hf-checkpoints"
    return {family: build(root / family) for family, build in BUILDERS.items()}


BACKENDS = ["mmcl", "llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "blip-2",
            "instructblip", "qwen2_audio"]
"""Every backend: the built-in composition ("mmcl", the micro model) and each native Hugging Face family."""
AUDIO_TASKS = ["audio_qa", "audio_cap"]


@pytest.fixture
def backend_overrides(micro_world, hf_checkpoints, tmp_path):
    """Overrides that put a run of `micro_overrides` on another backend: its tiny checkpoint, and for a family that
    reads only audio, the micro world's audio tasks instead of the image ones."""

    def make(backend: str, tasks: int = 2) -> list[str]:
        if backend == "mmcl":
            return []
        out = [f"model.path={hf_checkpoints[backend]}"]
        if backend == "qwen2_audio":
            out.append(f"data.stream={_sub_stream(micro_world, AUDIO_TASKS[:tasks], tmp_path, 'audio')}")
        return out

    return make


def _sub_stream(world: Path, tasks: list[str], where: Path, label: str = "image") -> Path:
    """A stream file naming the first few tasks of the micro world, with one retention task."""
    import yaml

    path = where / f"stream-{label}-{len(tasks)}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"micro-{len(tasks)}",
        "tasks": [str(world / "tasks" / t) for t in tasks],
        "retention": [str(world / "tasks" / "lang_arith")],
    }))
    return path
