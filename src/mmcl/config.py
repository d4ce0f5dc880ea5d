"""The run configuration: typed dataclasses, loaded from a YAML recipe plus `key=value` overrides, validated before
anything runs, and saved fully resolved into the run directory.

    mmcl run configs/image/sequential.yaml train.lr=3e-4 strategies=[lora,soft_targets] strategies.lora.r=16
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmcl.yaml_files import read_yaml_mapping

# Named compositions from the papers: each name expands to strategies with options (P1's mSGM and mSGM + R: LoRA
# merged into the base after every task with a fresh adapter for the next, P1's protocol, plus soft targets).
PRESETS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "msgm": [("lora", {"mode": "merge"}), ("soft_targets", {})],
    "msgm_rehearsal": [("lora", {"mode": "merge"}), ("soft_targets", {}), ("rehearsal", {})],
}


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the field and the fix."""


@dataclass
class ModelConfig:
    path: str = "tiny"
    """`tiny` (the built-in model, pre-trained by `mmcl pretrain` and cached), `small` (real weights: SmolLM2-135M +
    DINOv2-S + Whisper tiny.en, after `mmcl models prepare small`) or a local model directory: an mmcl
    model directory or a Hugging Face checkpoint (llava, llava_onevision, qwen2_vl, qwen2_5_vl, idefics3, smolvlm,
    blip-2, instructblip, qwen2_audio) saved with `save_pretrained` together with its processor."""
    backend: Literal["auto", "native", "composition"] = "auto"
    """How a Hugging Face checkpoint is run: `auto`/`native` use its own transformers class; `composition` maps a
    LLaVA checkpoint onto mmcl's encoder -> projector -> LM composition (per-modality projectors)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights' dtype. bfloat16 pays off from ~5M parameters up (and on GPUs)."""
    train: list[str] = field(default_factory=lambda: ["projectors", "language_model"])
    """Parts trained by default: any of encoders, projectors, language_model (LLaVA keeps encoders frozen)."""
    allow_pickle: bool = False
    """Allow loading pickle (.bin/.pt) weights. Pickles can run code: only for files you trust."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own Python code to run (Hugging Face `trust_remote_code`)."""
    feature_cache: Literal["auto", "always", "never"] = "auto"
    """Compute a frozen encoder's features once per media item and keep them under $MMCL_HOME/features (composition
    backend). auto: for frozen encoders of >= 5M parameters, where the forward costs more than reading a file."""


@dataclass
class DataConfig:
    stream: str = "builtin:image"
    """A stream file (YAML), or `builtin:<name>` for a stream of the built-in world (synthesized on first use)."""
    order: list[str] | None = None
    """Train tasks in this order (a permutation of the stream's task names), for task-order studies."""
    train_limit: int | None = None
    """Use only the first N training records of each task."""
    test_limit: int | None = None
    """Evaluate on only the first N test records of each task."""
    on_bad_record: Literal["error", "skip"] = "error"
    """`error`: stop before training and list every bad record. `skip`: leave them out, list them in skipped.jsonl."""
    max_bad_fraction: float = 0.05
    """With on_bad_record=skip, abort if more than this fraction of a split's records is bad."""
    allow_outside_root: bool = False
    """Allow media paths outside the task's data root (absolute paths, `..`, symlinks out). Off: data can't reach
    files it should not."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over each task's training data."""
    max_steps: int | None = None
    """Cap on optimizer steps per task (after epochs)."""
    batch_size: int = 16
    """Global batch size (per step, over all processes and accumulation steps)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the global batch stays `batch_size`."""
    lr: float = 3e-4
    """Peak learning rate (the defaults suit the built-in tiny model; LLaVA-7B full fine-tuning uses 2e-5)."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    precision: Literal["no", "bf16"] = "no"
    """Mixed precision through Accelerate (bf16: autocast over fp32 weights); evaluation runs at the same precision."""
    activation_checkpointing: bool = False
    """Recompute activations in backward instead of storing them (every backend's Hugging Face parts): less memory
    for a little more compute per step."""
    on_nonfinite: Literal["raise", "skip"] = "raise"
    """A NaN/inf loss: `raise` stops before the optimizer step; `skip` drops the step."""
    max_consecutive_skips: int = 5
    """With on_nonfinite=skip, abort after this many non-finite steps in a row."""
    early_stopping_patience: int = 0
    """Score each task on validation records after every epoch, stop its training after this many epochs without
    a better score, and keep the weights of its best epoch (P4: 5, with up to 40 epochs). 0: off."""
    val_fraction: float = 0.1
    """With early stopping, the share of a task's training records held out (seeded) for validation; a task with
    its own `val` split uses that instead."""
    log_with: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    """Experiment trackers (Accelerate's) for losses, matrix rows and final metrics; files go to RUN_DIR/tracking."""
    log_every: int = 10
    """With log_with: log the training loss every this many optimizer steps."""


@dataclass
class EvalConfig:
    batch_size: int = 64
    max_new_tokens: int | None = None
    """Override every task's generation budget."""
    num_beams: int = 1
    """Beam search width for every generation (evaluation and strategies' pseudo targets); 1 = greedy. P4: 5."""
    repetition_penalty: float = 1.0
    """Above 1 discourages repeating a token already generated in the answer (HF's CTRL-style penalty, applied to
    the new tokens since the prompt is fed as embeddings); P4: 1.15."""
    retention: bool = True
    """Evaluate the stream's retention (language-only) tasks at every row."""


@dataclass
class CheckpointConfig:
    keep_last: int = 2
    """Task-boundary checkpoints to keep (0 keeps all). The latest complete one is never pruned."""
    every_steps: int = 0
    """Also checkpoint every N optimizer steps inside a task (0: only at task boundaries); a resume then continues
    mid-task with exactly the batches an uninterrupted run would use. SIGTERM writes one too, except in runs that
    cannot resume inside a task (lwf, moincl, early stopping): they resume from the last task boundary."""


@dataclass
class StrategySpec:
    """One strategy of a run: its registered name and its options. The reserved option `per_task` maps task names
    to option values that replace the others during that task (P4 tunes MoInCL per step)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the default output directory is runs/<name>."""
    output_dir: str | None = None
    seed: int = 0
    """Seed for everything random (initialisation of new parameters, data order, dropout): 0 <= seed < 2**32."""
    strategies: list[StrategySpec] = field(default_factory=lambda: [StrategySpec("sequential")])
    """Continual-learning strategies, composed in order: e.g. [lora, soft_targets, rehearsal]."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def validate(self) -> RunConfig:
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed: {self.seed} is out of range; use an integer with 0 <= seed < 2**32")
        for key, value in (("train.batch_size", self.train.batch_size), ("train.epochs", self.train.epochs),
                           ("train.grad_accum", self.train.grad_accum), ("eval.batch_size", self.eval.batch_size),
                           ("train.log_every", self.train.log_every)):
            if value < 1:
                raise ConfigError(f"{key}: {value} must be >= 1")
        if self.train.batch_size % self.train.grad_accum:
            raise ConfigError(
                f"train.batch_size ({self.train.batch_size}) must be divisible by train.grad_accum "
                f"({self.train.grad_accum})"
            )
        if self.eval.num_beams < 1:
            raise ConfigError(f"eval.num_beams: {self.eval.num_beams} must be >= 1 (1 is greedy decoding)")
        if not self.eval.repetition_penalty > 0:
            raise ConfigError(f"eval.repetition_penalty: {self.eval.repetition_penalty} must be > 0 (1 is no penalty)")
        if self.train.early_stopping_patience < 0:
            raise ConfigError(f"train.early_stopping_patience: {self.train.early_stopping_patience} must be >= 0 "
                              "(0 turns early stopping off)")
        if not 0 < self.train.val_fraction < 1:
            raise ConfigError(f"train.val_fraction: {self.train.val_fraction} must be within (0, 1)")
        if self.train.early_stopping_patience and self.checkpoint.every_steps:
            raise ConfigError("checkpoint.every_steps: early stopping keeps the best epoch's weights in memory, so a "
                              "run cannot resume inside a task; use 0 (task boundaries) or "
                              "train.early_stopping_patience=0")
        if self.train.lr <= 0:
            raise ConfigError(f"train.lr: {self.train.lr} must be > 0")
        if not 0 <= self.data.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction: {self.data.max_bad_fraction} must be within [0, 1]")
        bad_parts = set(self.model.train) - {"encoders", "projectors", "language_model"}
        if bad_parts:
            raise ConfigError(f"model.train: unknown part(s) {sorted(bad_parts)}; use encoders, projectors, language_model")
        if not self.strategies:
            raise ConfigError("strategies: give at least one strategy, e.g. [sequential]")
        names = [s.name for s in self.strategies]
        if len(set(names)) != len(names):
            raise ConfigError(f"strategies: {names} names a strategy twice")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["strategies"] = [{s.name: s.options} if s.options else s.name for s in self.strategies]
        return d

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- loading ----------------------------------------------------------------------------------------------------------


def _parse_strategies(value: Any, where: str) -> list[StrategySpec]:
    if isinstance(value, str):
        value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of strategy names, e.g. [sequential] or [lora, ewc]")
    specs = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item in PRESETS:
            specs += [StrategySpec(name, dict(options)) for name, options in PRESETS[item]]
        elif isinstance(item, str):
            specs.append(StrategySpec(item))
        elif isinstance(item, dict) and len(item) == 1:
            (name, opts), = item.items()
            if opts is not None and not isinstance(opts, dict):
                raise ConfigError(f"{where}[{i}]: options of {name!r} must be a mapping, e.g. {{{name}: {{...}}}}")
            specs.append(StrategySpec(str(name), dict(opts or {})))
        elif isinstance(item, dict) and "name" in item:
            opts = {k: v for k, v in item.items() if k != "name"}
            specs.append(StrategySpec(str(item["name"]), opts))
        else:
            raise ConfigError(f"{where}[{i}]: write a strategy as a name or as {{name: {{option: value}}}}")
    return specs


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool):  # YAML reads a bare no / off as False (train.precision=no)
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((c for c in choices if isinstance(c, str) and c in words), value)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    raise ConfigError(f"{where}: unsupported type {hint}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(names)}"
        raise ConfigError(f"{where + '.' if where else ''}{k}: unknown key{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{where}.{name}" if where else name
        if cls is RunConfig and name == "strategies":
            kwargs[name] = _parse_strategies(data[name], key)
        else:
            kwargs[name] = _coerce(data[name], hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a dataclass's own __post_init__ check: prefix where it came from
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_override(data: dict, override: str) -> None:
    """Apply one `dotted.key=value` override to a raw config mapping (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: write overrides as key=value, e.g. train.lr=3e-4")
    key, _, raw = override.partition("=")
    parts = key.strip().split(".")
    value = _parse_scalar(raw)
    if parts[0] == "strategies" and len(parts) >= 3:
        # strategies.<name>.<option>=value sets an option of a strategy already in the list
        specs = _parse_strategies(data.get("strategies", ["sequential"]), "strategies")
        match = [s for s in specs if s.name == parts[1]]
        if not match:
            raise ConfigError(f"{key}: no strategy {parts[1]!r} in strategies {[s.name for s in specs]}; add it first")
        node = match[0].options
        for p in parts[2:-1]:  # strategies.moincl.per_task.image_qa.lambda_kl=0.5 nests under per_task
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p!r} is not a mapping of options")
        node[parts[-1]] = value
        data["strategies"] = [{s.name: s.options} for s in specs]
        return
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (optional), apply overrides, and return the validated config."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} not found")
        data = read_yaml_mapping(path, ConfigError, "a mapping of config sections at the top level", empty_ok=True)
    for o in overrides or []:
        apply_override(data, o)
    try:
        return _build(RunConfig, data, "").validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def config_from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data, "").validate()


def build_dataclass(cls: type, data: dict | None, where: str) -> Any:
    """Build any config dataclass from a mapping with the same checks and messages as the run config."""
    return _build(cls, data or {}, where)
