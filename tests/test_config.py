"""Tests of the run configuration (mmcl.config): YAML + overrides, type checks, messages, round trips, help."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from mmcl.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    StrategySpec,
    apply_override,
    build_dataclass,
    config_from_dict,
    load_config,
)
from mmcl.config_help import field_help


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "exp1",
                "seed": 7,
                "strategies": ["sequential"],
                "model": {"path": "tiny", "dtype": "bfloat16"},
                "data": {"stream": "builtin:image", "train_limit": 20},
                "train": {"epochs": 2, "batch_size": 8, "grad_accum": 2, "lr": 0.001},
            }
        )
    )
    return path


# -- loading ------------------------------------------------------------------------------------------------------


def test_load_config_from_yaml_file(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.name == "exp1"
    assert cfg.seed == 7
    assert cfg.model.dtype == "bfloat16"
    assert cfg.data.train_limit == 20
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum) == (2, 8, 2)
    assert cfg.strategies == [StrategySpec("sequential")]
    # untouched sections keep their defaults
    assert cfg.eval.batch_size == 64
    assert cfg.run_dir == Path("runs/exp1")


def test_overrides_are_applied_over_the_file(recipe: Path) -> None:
    cfg = load_config(
        recipe,
        [
            "train.lr=0.0003",
            "strategies=[lora,joint]",
            "strategies.lora.r=16",
            "data.order=[a,b]",
            "train.batch_size=4",
            "output_dir=/tmp/x",
        ],
    )
    assert cfg.train.lr == 0.0003
    assert isinstance(cfg.train.lr, float)
    assert cfg.strategies == [StrategySpec("lora", {"r": 16}), StrategySpec("joint", {})]
    assert cfg.data.order == ["a", "b"]
    assert cfg.train.batch_size == 4
    assert cfg.train.epochs == 2  # from the file
    assert cfg.run_dir == Path("/tmp/x")


def test_integer_lr_override_becomes_a_float() -> None:
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0
    assert type(cfg.train.lr) is float


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1e3", 1000.0)])
def test_scientific_notation_lr_override_is_a_float(text: str, value: float) -> None:
    cfg = load_config(None, [f"train.lr={text}"])
    assert cfg.train.lr == value


def test_scientific_notation_lr_in_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 3e-4\n")
    assert load_config(path).train.lr == 3e-4


def test_strategy_option_override_on_strategies_from_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("strategies:\n  - lora: {r: 4, alpha: 8}\n  - sequential\n")
    cfg = load_config(path, ["strategies.lora.r=16", "strategies.lora.dropout=0.1"])
    assert cfg.strategies == [StrategySpec("lora", {"r": 16, "alpha": 8, "dropout": 0.1}), StrategySpec("sequential")]


def test_option_of_a_strategy_not_in_the_list_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"strategies\.ewc\.lam: no strategy 'ewc' in strategies \['sequential'\]"):
        load_config(None, ["strategies.ewc.lam=3"])


def test_override_without_equals_sign_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"override 'train\.lr': write overrides as key=value"):
        apply_override({}, "train.lr")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping of config sections at the top level, got list"):
        load_config(path)


# -- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batsh_size=3", r"^train\.batsh_size: unknown key; did you mean 'batch_size'\?$"),
        ("trian.lr=3", r"^trian: unknown key; did you mean 'train'\?$"),
        ("data.on_bad_recrd=skip", r"^data\.on_bad_recrd: unknown key; did you mean 'on_bad_record'\?$"),
    ],
)
def test_unknown_key_suggests_the_close_match(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.zzzzz: unknown key; valid keys: keep_last, every_steps$"):
        load_config(None, ["checkpoint.zzzzz=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=abc", r"train\.batch_size: expected an integer, got 'abc'"),
        ("train.batch_size=2.5", r"train\.batch_size: expected an integer, got 2\.5"),
        ("train.lr=fast", r"train\.lr: expected a number, got 'fast'"),
        ("model.allow_pickle=maybe", r"model\.allow_pickle: expected true or false, got 'maybe'"),
        ("data.order=3", r"data\.order: expected a list, got 3"),
        ("data.train_limit=many", r"data\.train_limit: expected an integer, got 'many'"),
        ("model.train={a: 1}", r"model\.train: expected a list, got \{'a': 1\}"),
    ],
)
def test_wrong_type_names_the_dotted_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_wrong_type_in_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.batch_size: expected an integer, got 'lots'"):
        load_config(path)


def test_literal_choices_are_listed() -> None:
    with pytest.raises(ConfigError, match=r"train\.schedule: 'cos' is not one of 'cosine', 'linear', 'constant'"):
        load_config(None, ["train.schedule=cos"])
    with pytest.raises(ConfigError, match=r"data\.on_bad_record: 'ignore' is not one of 'error', 'skip'"):
        load_config(None, ["data.on_bad_record=ignore"])


def test_bare_no_that_yaml_reads_as_false_is_the_choice_no() -> None:
    assert load_config(None, ["train.precision=no"]).train.precision == "no"
    assert load_config(None, ["train.precision=bf16", "train.precision=off"]).train.precision == "no"
    with pytest.raises(ConfigError, match=r"train\.schedule: True is not one of"):
        load_config(None, ["train.schedule=yes"])  # no choice means yes there


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_out_of_range_is_refused_with_the_range(seed: int) -> None:
    with pytest.raises(ConfigError, match=rf"seed: {seed} is out of range; use an integer with 0 <= seed < 2\*\*32"):
        load_config(None, [f"seed={seed}"])


def test_seed_at_the_edges_is_accepted() -> None:
    assert load_config(None, ["seed=0"]).seed == 0
    assert load_config(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_batch_size_must_be_divisible_by_grad_accum() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size \(10\) must be divisible by train\.grad_accum \(4\)"):
        load_config(None, ["train.batch_size=10", "train.grad_accum=4"])
    assert load_config(None, ["train.batch_size=12", "train.grad_accum=4"]).train.grad_accum == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.batch_size=0"], r"train\.batch_size: 0 must be >= 1"),
        (["train.lr=0"], r"train\.lr: 0\.0 must be > 0"),
        (["eval.num_beams=0"], r"eval\.num_beams: 0 must be >= 1 \(1 is greedy decoding\)"),
        (["train.early_stopping_patience=-1"], r"train\.early_stopping_patience: -1 must be >= 0"),
        (["train.val_fraction=1"], r"train\.val_fraction: 1\.0 must be within \(0, 1\)"),
        (["train.early_stopping_patience=2", "checkpoint.every_steps=5"],
         r"checkpoint\.every_steps: early stopping keeps the best epoch's weights in memory"),
        (["eval.repetition_penalty=0"], r"eval\.repetition_penalty: 0\.0 must be > 0"),
        (["data.max_bad_fraction=1.5"], r"data\.max_bad_fraction: 1\.5 must be within \[0, 1\]"),
        (["model.train=[encoders,heads]"], r"model\.train: unknown part\(s\) \['heads'\]"),
        (["strategies=[]"], r"strategies: give at least one strategy"),
        (["strategies=[lora,lora]"], r"strategies: \['lora', 'lora'\] names a strategy twice"),
    ],
)
def test_validate_refuses_bad_values(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# -- round trip and help --------------------------------------------------------------------------------------------


def test_to_dict_and_dump_round_trip(recipe: Path) -> None:
    cfg = load_config(recipe, ["strategies=[lora,joint]", "strategies.lora.r=16", "data.order=[b,a]", "train.lr=0.5"])
    d = cfg.to_dict()
    assert d["strategies"] == [{"lora": {"r": 16}}, "joint"]
    assert d["train"]["lr"] == 0.5
    assert config_from_dict(d) == cfg
    assert config_from_dict(yaml.safe_load(cfg.dump())) == cfg
    # a different config is not equal: the comparison can fail
    assert config_from_dict(d) != load_config(recipe)


def test_dump_is_readable_by_load_config(recipe: Path, tmp_path: Path) -> None:
    cfg = load_config(recipe, ["strategies=[lora]", "strategies.lora.r=2"])
    out = tmp_path / "config.yaml"
    out.write_text(cfg.dump())
    assert load_config(out) == cfg


def test_default_config_dict() -> None:
    d = RunConfig().to_dict()
    assert list(d) == ["name", "output_dir", "seed", "strategies", "model", "data", "train", "eval", "checkpoint"]
    assert d["strategies"] == ["sequential"]
    assert config_from_dict({}) == RunConfig()


def test_field_help_covers_nested_keys_with_docstrings() -> None:
    rows = {key: (default, text) for key, default, text in field_help()}
    assert rows["data.on_bad_record"] == (
        "'error'",
        "`error`: stop before training and list every bad record. `skip`: leave them out, list them in skipped.jsonl.",
    )
    assert rows["seed"][0] == "0"
    assert "0 <= seed < 2**32" in rows["seed"][1]
    assert rows["strategies"][0] == "['sequential']"
    assert rows["model.allow_pickle"] == (
        "False",
        "Allow loading pickle (.bin/.pt) weights. Pickles can run code: only for files you trust.",
    )
    assert rows["checkpoint.keep_last"][0] == "2"
    # sections are expanded, never listed as rows of their own
    assert "data" not in rows and "train" not in rows
    # one row per leaf field, in declaration order
    expected_model = [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    assert [k for k in rows if k.startswith("model.")] == expected_model
    assert list(rows)[:4] == ["name", "output_dir", "seed", "strategies"]


@dataclass
class _Small:
    width: int = 3
    """How wide."""
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    ratio: float | None = None


def test_build_dataclass_on_a_small_dataclass() -> None:
    obj = build_dataclass(_Small, {"width": 5, "mode": "b", "tags": "[x, y]", "ratio": 1}, "strategies.foo")
    assert obj == _Small(width=5, mode="b", tags=["x", "y"], ratio=1.0)
    assert type(obj.ratio) is float
    assert build_dataclass(_Small, None, "strategies.foo") == _Small()


def test_build_dataclass_errors_are_prefixed_with_where() -> None:
    with pytest.raises(ConfigError, match=r"^strategies\.foo\.widht: unknown key; did you mean 'width'\?$"):
        build_dataclass(_Small, {"widht": 5}, "strategies.foo")
    with pytest.raises(ConfigError, match=r"^strategies\.foo\.mode: 'c' is not one of 'a', 'b'$"):
        build_dataclass(_Small, {"mode": "c"}, "strategies.foo")
    with pytest.raises(ConfigError, match=r"^strategies\.foo\.width: expected an integer, got True$"):
        build_dataclass(_Small, {"width": True}, "strategies.foo")


def test_field_help_of_a_small_dataclass() -> None:
    assert field_help(_Small, "strategies.foo.") == [
        ("strategies.foo.width", "3", "How wide."),
        ("strategies.foo.mode", "'a'", ""),
        ("strategies.foo.tags", "[]", ""),
        ("strategies.foo.ratio", "None", ""),
    ]


def test_presets_expand_to_their_strategies_and_take_options():
    from mmcl.config import load_config

    cfg = load_config(None, ["strategies=[msgm_rehearsal]", "strategies.lora.r=4"])
    assert [s.name for s in cfg.strategies] == ["lora", "soft_targets", "rehearsal"]
    assert cfg.strategies[0].options == {"mode": "merge", "r": 4}  # P1's protocol: LoRA merged after each task


def test_every_recipe_in_configs_loads():
    from pathlib import Path

    from mmcl.config import load_config
    from mmcl.strategies import build_strategies

    # configs/accelerate holds Accelerate launcher configs (tested in test_distributed_config), not run recipes
    recipes = sorted(p for p in Path(__file__).parent.parent.glob("configs/**/*.yaml") if p.parent.name != "accelerate")
    assert len(recipes) >= 15
    for path in recipes:
        build_strategies(load_config(path).strategies)  # every name and option exists


def test_compare_method_syntax_composes_and_sets_options():
    from mmcl.compare import parse_methods

    methods = parse_methods("sequential, lora[mode=merge;r=4]+soft_targets ,msgm")
    assert [m.label for m in methods] == ["sequential", "lora[mode=merge;r=4]+soft_targets", "msgm"]
    assert methods[1].strategies == ["lora", "soft_targets"]
    assert methods[1].options == ["strategies.lora.mode=merge", "strategies.lora.r=4"]
    with pytest.raises(ValueError, match="must be key=value"):
        parse_methods("lora[merge]")


def test_an_empty_recipe_is_the_defaults_and_bad_yaml_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).train == load_config(None).train
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
