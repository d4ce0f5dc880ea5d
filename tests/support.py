"""The one place for helpers shared by several test files (and by the child processes some of them launch). A test
module imports what it needs from here, never from another test module; fixtures live in conftest.py, which may
import from here too.

  backends       BACKENDS, AUDIO_TASKS
  micro runs     CASES, QUIET, FAST, fast_engine, overrides_for, engine_objects, stream_file, die_at_row
  models         tiny_llava
  reliability    the `Probe` strategy (PROBE), which records which samples each step consumed and injects a fault at
                 a chosen task and step, and helpers that compare run directories and checkpoints (latest,
                 tensors_of, assert_tensors_equal, computed_state, assert_same_run, probe_seen,
                 assert_no_partial_checkpoints)

The probe is registered by conftest's `probe` fixture (and popped afterwards), never at import, so the registry-wide
contract test does not see it. A child process registers it itself (see reliability_child.py); it has no pytest, so
this module does not import pytest, and imports the heavier parts of mmcl only inside the helpers that use them.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from mmcl.engine import checkpoint as ck
from mmcl.models.base import MLLM, Processor
from mmcl.strategies import Strategy

if TYPE_CHECKING:
    from mmcl.engine.context import Context

# -- backends ---------------------------------------------------------------------------------------------------------

BACKENDS = ["mmcl", "llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "blip-2",
            "instructblip", "qwen2_audio"]
"""Every backend: the built-in composition ("mmcl", the micro model) and each native Hugging Face family."""
AUDIO_TASKS = ["audio_qa", "audio_cap"]

# -- micro runs -------------------------------------------------------------------------------------------------------

# strategy name -> how to run it: its options, and partners listed before it (a strategy with supports_full=False
# needs an adapter; llaca is run as P2 runs it, on a carried LoRA). Every registered strategy needs a row:
# tests/test_strategy_contract.py fails until it has one.
CASES: dict[str, dict] = {
    "sequential": {},
    "joint": {},
    "lora": {"options": {"r": 4}},
    "ia3": {},
    "soft_targets": {"options": {"alpha": 0.1}},
    "freeze_last_block": {},
    "freeze_output_embedding": {},
    "rehearsal": {"options": {"fraction": 0.25}},
    "ema": {"options": {"beta": 0.9}},
    "llaca": {"before": ["lora"], "options": {"k": 2.0, "base": 0.01}},
    "ewc": {},
    "mas": {},
    "lwf": {},
    "replay": {},
    "moincl": {},
    "tir_ewc": {"options": {"similarity.max_samples": 4}},
    "tir_mas": {"options": {"similarity.max_samples": 4}},
    "eproj": {"options": {"key_steps": 5}},
}

QUIET = dict(progress=False, log=lambda *a: None)
# Small and fast: 8 training records, 2 steps of 4 per task, 1 test record, 1 generated token, no retention task.
FAST = {"data.train_limit": 8, "train.batch_size": 4, "train.max_steps": 2, "data.test_limit": 1,
        "eval.max_new_tokens": 1, "eval.retention": "false"}


def fast_engine(monkeypatch) -> None:
    """Skip what these tests do not look at and what dominates a micro run: the report's plots, and the full
    garbage collection accelerate's free_memory runs after each task (~0.5 s in a large test process)."""
    import gc

    import mmcl.report

    monkeypatch.setattr(mmcl.report, "write_report", lambda run_dir: None)
    monkeypatch.setattr(gc, "collect", lambda *a, **k: 0)


def overrides_for(micro_overrides, run_name: str, strategy: str, tasks: int = 2, backend: list[str] | None = None,
                  **extra) -> list[str]:
    """A fast run of `strategy` (with its CASES partners and options) on the micro stream; `backend` overrides
    (conftest's `backend_overrides`) move it onto another model family."""
    case = CASES[strategy]
    names = [*case.get("before", []), strategy]
    opts = {f"strategies.{strategy}.{k}": v for k, v in case.get("options", {}).items()}
    return micro_overrides(run_name, tasks=tasks, strategies=f"[{','.join(names)}]", **FAST, **opts,
                           **extra) + (backend or [])


def engine_objects(overrides: list[str]) -> tuple[Context, list[Strategy]]:
    """The context and strategies exactly as `loop.run` builds them, up to and including prepare_model."""
    from mmcl.config import load_config
    from mmcl.engine.setup import build_context
    from mmcl.seeding import seed_everything

    cfg = load_config(None, overrides)
    seed_everything(cfg.seed)
    ctx, strategies, _ = build_context(cfg, log=QUIET["log"])
    strategies.prepare_model(ctx)
    return ctx, strategies


def stream_file(world: Path, tasks: Sequence[str], where: Path, label: str = "image") -> Path:
    """A stream file in `where` naming `tasks` of the micro world `world`, in that order, with one retention task
    (lang_arith). The file is named after the label and the tasks, so two different streams written in one test
    never overwrite each other's file (and one written twice has the same content both times)."""
    import yaml

    path = where / f"stream-{label}-{'-'.join(tasks)}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"micro-{len(tasks)}",
        "tasks": [str(world / "tasks" / t) for t in tasks],
        "retention": [str(world / "tasks" / "lang_arith")],
    }))
    return path


def plant_test_record(world: Path, where: Path) -> tuple[Path, str, int]:
    """A copy of `world` in `where` whose image_cap train split ends with captioning's test record 3 (its image
    copied under another name, its prompt in other case and punctuation) and two near misses that are no test
    record: the same image with another prompt, and the same prompt with another image. Returns the copy, the
    planted record's "task/id" and its line in image_cap/train.jsonl."""
    import shutil

    copy = where / "world-planted"
    shutil.copytree(world, copy)
    caption, cap = copy / "tasks" / "caption", copy / "tasks" / "image_cap"
    test = json.loads((caption / "test.jsonl").read_text().splitlines()[3])
    train = (cap / "train.jsonl").read_text().splitlines()
    other_image = json.loads(train[0])["image"]
    shutil.copy(caption / test["image"], cap / "images" / "planted.png")
    answer = {"from": "gpt", "value": test["conversations"][1]["value"]}
    asked = test["conversations"][0]["value"].replace("Describe", "DESCRIBE  ").rstrip(".") + "!"
    planted = [
        {"id": "planted", "image": "images/planted.png", "conversations": [{"from": "human", "value": asked}, answer]},
        {"id": "other-prompt", "image": "images/planted.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat is shown here?"}, answer]},
        {"id": "other-image", "image": other_image, "conversations": [{"from": "human", "value": asked}, answer]},
    ]
    (cap / "train.jsonl").write_text("\n".join(train + [json.dumps(r) for r in planted]) + "\n")
    return copy, f"caption/{test['id']}", len(train) + 1


# -- models -----------------------------------------------------------------------------------------------------------


def tiny_llava(tokenizer, feature_layer: int, select: str):
    """A tiny random LlavaForConditionalGeneration (CLIP vision tower, Llama text model) over `tokenizer`'s
    vocabulary, its weights drawn after torch.manual_seed(0), in eval mode."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=select,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


# -- reliability: the probe strategy ----------------------------------------------------------------------------------

PROBE = "probe_test"


class Probe(Strategy):
    """Records the ids of every training batch in its JSON state; optionally injects one fault (test only).

    `Probe.plan` (class attribute, set by a test) may hold:
      fail: {"hook": name, "task": i, "step": k}   raise RuntimeError("boom") from that hook
      sigterm: [[task, step], ...]                 os.kill(self, SIGTERM) in after_optimizer_step at those steps
      nonfinite: {"task": i, "steps": [k, ...] | "all", "value": "nan" | "inf"}   poison the loss (extra_loss)
    Steps are 0-based indices of the batches drawn in a task (a skipped step counts too), taken from the recorded
    ids, so they survive a resume. `snapshots` holds the trainable weights at the start of every step.
    """

    plan: dict = {}
    instances: list[Probe] = []

    def __init__(self, config=None):
        super().__init__(config)
        self.seen: list[list] = []  # [task_index, [ids...]] per training batch, in order
        self.ctx = None  # the engine's context, from on_task_start
        self.snapshots: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        Probe.instances.append(self)

    def _step(self, ctx) -> int:
        return sum(1 for t, _ in self.seen if t == ctx.task_index) - 1

    def _maybe_fail(self, hook: str, ctx, step: int | None = None) -> None:
        f = self.plan.get("fail")
        if f and f["hook"] == hook and f["task"] == ctx.task_index and (step is None or f.get("step") in (None, step)):
            raise RuntimeError("boom")

    def on_task_start(self, ctx) -> None:
        self.ctx = ctx
        self._maybe_fail("on_task_start", ctx)

    def transform_batch(self, ctx, batch: dict) -> dict:
        self.seen.append([ctx.task_index, list(batch.ids)])
        step = self._step(ctx)
        if self.plan.get("snapshot"):
            weights = {n: p.detach().clone() for n, p in ctx.trainable_parameters()}
            self.snapshots.append((ctx.task_index, step, weights))
        self._maybe_fail("transform_batch", ctx, step)
        return batch

    def extra_loss(self, ctx, batch: dict, outputs):
        step = self._step(ctx)
        self._maybe_fail("extra_loss", ctx, step)
        bad = self.plan.get("nonfinite")
        if bad and bad["task"] == ctx.task_index and (bad["steps"] == "all" or step in bad["steps"]):
            return outputs.logits.float().mean() * float(bad["value"])
        return None

    def after_optimizer_step(self, ctx) -> None:
        step = self._step(ctx)
        self._maybe_fail("after_optimizer_step", ctx, step)
        if [ctx.task_index, step] in [list(x) for x in self.plan.get("sigterm", [])]:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_task_end(self, ctx) -> None:
        self._maybe_fail("on_task_end", ctx)

    def state_dict(self):
        if getattr(self, "ctx", None) is not None:
            self._maybe_fail("state_dict", self.ctx)
        return {}, {"seen": self.seen}

    def load_state_dict(self, tensors, meta) -> None:
        self.seen = [list(x) for x in meta.get("seen", [])]


# -- comparing runs ---------------------------------------------------------------------------------------------------


def die_at_row(monkeypatch, row: int):
    """Make the evaluation of accuracy-matrix row `row` crash (so that task's checkpoint is never written); returns
    the real function to put back."""
    from mmcl.engine import loop

    real = loop.evaluate_row

    def dying(ctx, r, progress):
        if r == row:
            raise KeyboardInterrupt("simulated crash")
        return real(ctx, r, progress)

    monkeypatch.setattr(loop, "evaluate_row", dying)
    return real


def latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def tensors_of(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of a checkpoint, copied out of the file (load_file may map it, and a test that then
    corrupts the file in place would change the tensors it kept)."""
    return {f.stem: {k: v.clone() for k, v in load_file(str(f)).items()} for f in sorted(ckpt.glob("*.safetensors"))}


DDP_ATOL = 5e-5
"""How far one weight of 2 processes may sit from 1 process's (docs/reliability.md): the gradients match up to float
summation order, but Adam divides each by its own running scale, so a weight whose gradient is within that noise of
zero can move by a fraction of a step (observed: one weight of 164,800 at 1.9e-5, every other within 1e-6)."""
DDP_SHARE = 1e-3
"""The most weights that may differ by more than 1e-6 (a real difference, another global batch, moves ~24 %)."""


def weight_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tiny: float = 1e-6) -> tuple[float, float]:
    """(largest |a - b| over every weight, share of weights with |a - b| > tiny) of two state dicts."""
    assert a.keys() == b.keys(), f"different keys {sorted(set(a) ^ set(b))[:5]}"
    gaps = [(a[k] - b[k]).abs() for k in a]
    total = sum(g.numel() for g in gaps)
    return max(float(g.max()) for g in gaps), sum(int((g > tiny).sum()) for g in gaps) / total


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys {sorted(set(a) ^ set(b))[:5]}"
    diff = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: not bitwise equal: {diff[:5]}"


def computed_state(ckpt: Path) -> dict:
    """The parts of a checkpoint's state.json that the run computed (not its name, paths or timings)."""
    s = json.loads((ckpt / "state.json").read_text())
    cost = s["cost"]
    return {"rows": s["rows"], "strategies": s["strategies"], "task_index": s["task_index"],
            "losses": cost["losses"], "counts": [cost["steps"], cost["samples"], cost["skipped_steps"]]}


def assert_same_run(a: Path, b: Path) -> None:
    """Two finished runs computed the same thing: final checkpoint tensors (weights, strategy state), state, matrix,
    losses; bitwise."""
    ca, cb = latest(a), latest(b)
    assert ca.name == cb.name
    ta, tb = tensors_of(ca), tensors_of(cb)
    assert ta.keys() == tb.keys()
    for group in ta:
        assert_tensors_equal(ta[group], tb[group], f"{group}.safetensors")
    assert computed_state(ca) == computed_state(cb)
    for f in ("matrix.json", "losses.json"):
        assert json.loads((a / f).read_text()) == json.loads((b / f).read_text()), f


def probe_seen(ckpt: Path) -> list:
    return json.loads((ckpt / "state.json").read_text())["strategies"][PROBE]["seen"]


def assert_no_partial_checkpoints(run_dir: Path) -> None:
    """No temporary or half-renamed directory is left, and every checkpoint directory verifies."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    for d in root.iterdir():
        if d.is_dir():
            ck.verify_checkpoint(d)
    if (root / "latest").exists():
        ck.verify_checkpoint(latest(run_dir))


# -- a model whose log-probabilities are known by hand (language probes, lm-eval adapter) ----------------------------------------------------------------

# Vocabulary: <s>=0, a=1, b=2, c=3. Row t: the next-token distribution after token t (each row sums to 1).
NEXT = torch.tensor([
    [0.10, 0.40, 0.40, 0.10],  # after <s>
    [0.05, 0.50, 0.25, 0.20],  # after a
    [0.10, 0.10, 0.20, 0.60],  # after b
    [0.25, 0.25, 0.25, 0.25],  # after c
])  # fmt: skip


class Bigram(MLLM):
    """A real (tiny) MLLM whose logits at a position are log NEXT[token]: every log-likelihood is a sum of logs of
    the table's entries."""

    modalities = ()

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(NEXT.log(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])

    def media_inputs(self, media, input_ids):
        return {}


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<s>": 0, "a": 1, "b": 2, "c": 3}, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", pad_token="<s>")


def word_processor() -> Processor:
    proc = Processor()
    proc.tokenizer, proc.pad_id, proc.eos_ids = word_tokenizer(), 0, [0]
    return proc


def sigterm_at_first_mid_task_checkpoint(command: list[str], run_dir: Path, env: dict, timeout: float = 120,
                                         poll: float = 0.02, target=None) -> tuple[int, str, str]:
    """Start `command`, send SIGTERM as soon as its run directory holds a mid-task checkpoint, and return (exit
    code, stdout, stderr); the process is killed if it outlives the test. `target(pid)` picks another process to
    signal (one rank of a launched run) instead of the started one."""
    import subprocess
    import time

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not list((run_dir / "checkpoints").glob("*-step-*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no mid-task checkpoint appeared"
            time.sleep(poll)
        os.kill(target(proc.pid) if target else proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err
