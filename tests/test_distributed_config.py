"""Distributed runs through Accelerate (docs/distributed.md): the shipped Accelerate configs, the checks made before
any process starts (engine vs machine, precision, DeepSpeed batch sizes), and the strategy x engine refusals. All in
one process, in well under a second each; the launched runs are in test_distributed_launch.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from mmcl.cli import main
from mmcl.config import ConfigError, RunConfig, TrainConfig
from mmcl.engine.distributed import check_deepspeed, check_launch, read_launch_config
from mmcl.engine.setup import make_accelerator
from mmcl.strategies import Strategy
from mmcl.strategies.registry import (
    NOT_MEASURED,
    SHARDED_ENGINES,
    check_composition,
    engine_refusal,
    get_strategy,
    list_strategies,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU refuses")


def run_config(**train) -> RunConfig:
    return RunConfig(train=TrainConfig(**train)).validate()


# -- the shipped configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, engine, kind", [("ddp", "ddp", "MULTI_GPU"), ("fsdp", "fsdp", "FSDP"),
                                                ("deepspeed_zero2", "deepspeed-zero2", "DEEPSPEED"),
                                                ("deepspeed_zero3", "deepspeed-zero3", "DEEPSPEED")])
def test_shipped_configs_are_read_by_accelerate_itself_and_name_their_engine(name, engine, kind):
    path = CONFIGS / f"{name}.yaml"
    theirs = load_config_from_file(str(path))  # what `accelerate launch --config_file` reads
    assert str(theirs.distributed_type) == f"DistributedType.{kind}" and theirs.num_processes == 2
    ours = read_launch_config(path)
    assert (ours.engine, ours.num_processes, ours.mixed_precision) == (engine, 2, "no")
    if name == "fsdp":  # FSDP2, full shard, sharded state dict
        assert theirs.fsdp_config["fsdp_version"] == 2
        assert theirs.fsdp_config["fsdp_reshard_after_forward"] is True
        assert theirs.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


def test_a_bad_accelerate_config_file_is_one_error_naming_the_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_launch_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: TPU\nnum_processes: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: distributed_type='TPU' is not one mmcl runs"):
        read_launch_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        read_launch_config(bad)
    bad.write_text("distributed_type: MULTI_GPU\nnum_processes: 0\n")
    with pytest.raises(ConfigError, match="num_processes=0"):
        read_launch_config(bad)


# -- checks before launch --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_fsdp_and_deepspeed_are_refused_on_a_machine_without_a_gpu_before_launch(name):
    with pytest.raises(ConfigError, match="needs GPUs and this machine has none: Accelerate 1.15 enables"):
        check_launch(read_launch_config(CONFIGS / f"{name}.yaml"), run_config(), gpu=False)


@pytest.mark.parametrize("name, engine", [("fsdp", "fsdp"), ("deepspeed_zero2", "deepspeed-zero2"),
                                          ("deepspeed_zero3", "deepspeed-zero3")])
def test_shipped_sharded_configs_agree_with_the_default_run_and_only_the_strategy_is_refused_on_a_gpu(name, engine):
    """With a GPU, the shipped files pass every consistency check against the defaults (batch, accumulation,
    clipping, precision); what stops the run is that no strategy has been measured under the engine."""
    with pytest.raises(ConfigError, match=f"'sequential' cannot run under the {engine} engine: mmcl has not been run"):
        check_launch(read_launch_config(CONFIGS / f"{name}.yaml"), run_config(), gpu=True)
    with pytest.raises(ConfigError, match="mixed_precision='no' but train.precision='bf16'"):
        check_launch(read_launch_config(CONFIGS / f"{name}.yaml"), run_config(precision="bf16"), gpu=True)


def test_the_file_precision_must_equal_train_precision():
    launch = read_launch_config(CONFIGS / "ddp.yaml")
    check_launch(launch, run_config(), gpu=False)  # 'no' and 'no': accepted
    with pytest.raises(ConfigError, match=r"ddp.yaml: mixed_precision='no' but train.precision='bf16'"):
        check_launch(launch, run_config(precision="bf16"), gpu=False)


def ds_json(**fields) -> dict:
    return {"zero_optimization": {"stage": 2}, **fields}


def test_deepspeed_batch_sizes_and_clipping_must_agree_with_the_run():
    # train.batch_size 8 = micro 2 x grad_accum 2 x 2 processes: agrees
    cfg = run_config(batch_size=8, grad_accum=2)
    check_deepspeed(ds_json(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, train_batch_size=8), cfg,
                    2, "ds.json")
    check_deepspeed(ds_json(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto"), cfg, 2, "ds.json")
    with pytest.raises(ConfigError, match=r"ds.json: .* = 4 × 2 × 2 = 16, but train.batch_size=8"):
        check_deepspeed(ds_json(train_micro_batch_size_per_gpu=4), cfg, 2, "ds.json")
    with pytest.raises(ConfigError, match=r"= 2 × 2 × 4 = 16, but train.batch_size=8"):  # same file, 4 processes
        check_deepspeed(ds_json(train_micro_batch_size_per_gpu=2), cfg, 4, "ds.json")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=1 but train.grad_accum=2"):
        check_deepspeed(ds_json(gradient_accumulation_steps=1), cfg, 2, "ds.json")
    with pytest.raises(ConfigError, match="train_batch_size=16 but train.batch_size=8"):
        check_deepspeed(ds_json(train_batch_size=16), cfg, 2, "ds.json")
    with pytest.raises(ConfigError, match="gradient_clipping=0.5 but train.max_grad_norm=1.0"):
        check_deepspeed(ds_json(gradient_clipping=0.5), cfg, 2, "ds.json")
    check_deepspeed(ds_json(gradient_clipping=1), cfg, 2, "ds.json")  # 1 and 1.0 agree


def test_deepspeed_precision_must_equal_train_precision():
    check_deepspeed(ds_json(bf16={"enabled": True}), run_config(precision="bf16"), 1, "ds.json")
    check_deepspeed(ds_json(bf16={"enabled": "auto"}), run_config(), 1, "ds.json")
    with pytest.raises(ConfigError, match=r"DeepSpeed precision is bf16 .* but train.precision=no"):
        check_deepspeed(ds_json(bf16={"enabled": True}), run_config(), 1, "ds.json")
    with pytest.raises(ConfigError, match=r"DeepSpeed precision is fp16 .* but train.precision=bf16"):
        check_deepspeed(ds_json(fp16={"enabled": True}), run_config(precision="bf16"), 1, "ds.json")
    with pytest.raises(ConfigError, match=r"DeepSpeed precision is no .* but train.precision=bf16"):
        check_deepspeed(ds_json(), run_config(precision="bf16"), 1, "ds.json")


def test_a_deepspeed_json_named_by_the_accelerate_config_is_checked_before_anything_else(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(ds_json(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1)))
    acc = yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text())
    acc["deepspeed_config"] = {"deepspeed_config_file": str(ds)}
    path = tmp_path / "acc.yaml"
    path.write_text(yaml.safe_dump(acc))
    launch = read_launch_config(path)
    assert launch.engine == "deepspeed-zero2" and launch.deepspeed["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(ConfigError, match=r"acc.yaml: .* = 8 × 1 × 2 = 16, but train.batch_size=4"):
        check_launch(launch, run_config(batch_size=4), gpu=True)
    # consistent (8 x 1 x 2 = 16): what remains is the strategy refusal, naming the strategy and the engine
    with pytest.raises(ConfigError, match="'sequential' cannot run under the deepspeed-zero2 engine"):
        check_launch(launch, run_config(batch_size=16), gpu=True)


# -- strategy x engine -----------------------------------------------------------------------------------------------


class Gradients(Strategy):
    name = "reads_grads"
    reads_gradients = True


class Parameters(Strategy):
    name = "reads_params"
    reads_parameters = True


class MeasuredUnderZero2(Strategy):
    name = "measured"
    sharded_engines = frozenset({"deepspeed-zero2"})


def test_structural_refusals_give_their_reason_and_unmeasured_engines_say_so():
    assert "param.grad is None" in engine_refusal(Gradients(), "deepspeed-zero1")
    assert "empty placeholder" in engine_refusal(Parameters(), "deepspeed-zero3")
    assert NOT_MEASURED in engine_refusal(Parameters(), "deepspeed-zero2")  # ZeRO-2 keeps whole parameters
    assert NOT_MEASURED in engine_refusal(Gradients(), "fsdp")
    assert engine_refusal(MeasuredUnderZero2(), "deepspeed-zero2") is None
    assert NOT_MEASURED in engine_refusal(MeasuredUnderZero2(), "deepspeed-zero3")
    for engine in ("single", "ddp"):
        assert engine_refusal(Gradients(), engine) is None and engine_refusal(Parameters(), engine) is None


def test_check_composition_refuses_a_strategy_under_an_engine_naming_both():
    check_composition([MeasuredUnderZero2()], modalities={"image"}, num_processes=2, engine="deepspeed-zero2")
    with pytest.raises(ConfigError, match="'reads_grads' cannot run under the deepspeed-zero2 engine: it reads "
                                          "param.grad"):
        check_composition([MeasuredUnderZero2(), Gradients()], modalities={"image"}, num_processes=2,
                          engine="deepspeed-zero2")
    with pytest.raises(ValueError, match="unknown engine 'zero9'"):
        check_composition([], modalities=set(), engine="zero9")


def test_every_registered_strategy_is_refused_under_every_unmeasured_sharded_engine():
    """The honest table: no strategy has been run under FSDP or DeepSpeed (no GPU), so none claims one."""
    for name in list_strategies():
        strategy = get_strategy(name)()
        for engine in sorted(SHARDED_ENGINES):
            why = engine_refusal(strategy, engine)
            assert why is not None and f"'{name}' cannot run under the {engine} engine" in why


# -- inside a launched process and through the CLI ------------------------------------------------------------------


@no_gpu
@pytest.mark.parametrize("env, kind", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")])
def test_accelerate_launch_asking_for_fsdp_or_deepspeed_on_a_cpu_is_refused_not_run_as_ddp(monkeypatch, env, kind):
    """`accelerate launch --config_file fsdp.yaml -m mmcl run` sets ACCELERATE_USE_FSDP in each process; Accelerate
    1.15 would then set up DDP on a CPU (measured), so the engine refuses before building the Accelerator."""
    monkeypatch.setenv(env, "true")
    with pytest.raises(ConfigError, match=f"accelerate launch asked for {kind}, which needs GPUs"):
        make_accelerator(run_config())


@no_gpu
def test_cli_refuses_fsdp_on_this_machine_in_one_line_before_launching(micro_overrides, capsys):
    args = micro_overrides("fsdp", tasks=1)
    assert main(["run", *args, "--accelerate-config", str(CONFIGS / "fsdp.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {CONFIGS / 'fsdp.yaml'}: distributed_type FSDP needs GPUs")
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    assert not run_dir.exists(), "nothing is written before the launch is refused"
