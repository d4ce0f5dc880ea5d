"""MoInCL (P4): options, instruction files, PTGM pseudo examples in both directions, KD on pseudo rows, IKD,
fusion, each part on its own, and end-to-end runs through the engine on a [caption, color_qa] micro stream."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from support import QUIET, stream_file

import mmcl.report
from mmcl.config import ConfigError, load_config
from mmcl.data.batching import Example
from mmcl.data.records import Record
from mmcl.engine import loop, setup
from mmcl.engine.setup import build_context
from mmcl.eval.generate import generate_answers
from mmcl.models.losses import token_cross_entropy_sum
from mmcl.seeding import seed_everything
from mmcl.strategies import build_strategies, get_strategy
from mmcl.strategies.lwf import distillation_loss
from mmcl.strategies.moincl import IKD_PREFIX, MoInCL, MoInCLOptions, load_instructions

FAST = {"train.max_steps": 2, "data.test_limit": 2, "eval.max_new_tokens": 2, "eval.retention": "false"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def overrides(micro_world, micro_overrides, tmp_path):
    def make(name: str, tasks=("caption", "color_qa"), **extra) -> list[str]:
        o = micro_overrides(name, tasks=1, **FAST)
        stream = stream_file(micro_world, list(tasks), tmp_path)
        return o + [f"data.stream={stream}"] + [f"{k}={v}" for k, v in extra.items()]

    return make


def make_ctx(overrides: list[str]):
    """The Context `loop.run` builds, without running anything."""
    cfg = load_config(None, overrides)
    seed_everything(cfg.seed)
    ctx, _, _ = build_context(cfg, log=QUIET["log"])
    ctx.task_index = 0
    return ctx


def at_task_1(ctx, strategy: MoInCL):
    strategy.prepare_model(ctx)
    ctx.task_index = 0
    strategy.on_task_start(ctx)
    assert strategy.teacher is None
    strategy.on_task_end(ctx)
    ctx.task_index = 1
    strategy.on_task_start(ctx)
    own = ctx.train_examples(ctx.task.name)
    return own, strategy.train_examples(ctx, own)


# -- options and instruction files -------------------------------------------------------------------------------


def test_options_are_validated_with_the_option_named(tmp_path):
    for kwargs, match in [
        ({"pseudo_num": 0}, "pseudo_num must be an integer >= 1"),
        ({"text_instruct_num": 0}, "text_instruct_num must be an integer >= 1.*ikd=false"),
        ({"lambda_kl": -1.0}, "lambda_kl"),
        ({"lambda_kl": float("nan")}, "lambda_kl"),
        ({"temperature": 0.0}, "temperature"),
        ({"fusion_alpha": 0.0}, "fusion_alpha must be in"),
        ({"fusion_alpha": 1.5}, "fusion_alpha"),
        ({"fusion_every": "step"}, "fusion_every must be 'epoch' or 'task'"),
        ({"ikd_mode": "ce"}, "ikd_mode must be 'kl' or 'pseudo'"),
        ({"ikd_max_new_tokens": 0}, "ikd_max_new_tokens must be an integer >= 1"),
        ({"instructions": ""}, "instructions must name"),
        ({"instructions": str(tmp_path / "none.jsonl")}, "instructions: file not found"),
        ({"pseudo": "yes"}, "pseudo must be true or false"),
    ]:
        with pytest.raises(ValueError, match=match):
            MoInCLOptions(**kwargs)
    from mmcl.config import StrategySpec
    from mmcl.strategies.registry import build_strategies as build

    with pytest.raises((ConfigError, ValueError), match="moincl"):
        build([StrategySpec("moincl", {"temperature": -1})])
    with pytest.raises((ConfigError, ValueError), match="moincl"):
        build([StrategySpec("moincl", {"pseudonum": 2})])
    ok = MoInCLOptions(fusion_alpha=0.5)
    assert ok.temperature == 5.0 and ok.lambda_kl == 1.0 and ok.pseudo_num == 4 and ok.text_instruct_num == 4
    cls = get_strategy("moincl")
    assert cls.needs_teacher and not cls.supports_mid_task_resume and not cls.provides_peft
    for word in ("P4", "PTGM", "IKD", "Fusion", "State", "Natural Instructions", "every epoch", "per_task"):
        assert word in cls.__doc__


def test_load_instructions_formats_and_refusals(tmp_path):
    jsonl = tmp_path / "i.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in [
        "Say hi.", {"prompt": "Add.", "input": "2 and 3"}, {"instruction": "Spell cat."},
        {"conversations": [{"from": "human", "value": "Name a colour."}]},
    ]) + "\n")
    convs = load_instructions(jsonl)
    assert [c[0]["value"] for c in convs] == ["Say hi.", "Add.\n2 and 3", "Spell cat.", "Name a colour."]
    assert all(c[-1]["from"] == "human" for c in convs)  # prompts only: the teacher gives the answers
    answered = tmp_path / "a.jsonl"
    answered.write_text(json.dumps({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}))
    assert load_instructions(answered) == [[{"from": "human", "value": "Q"}]]
    lst = tmp_path / "i.json"
    lst.write_text(json.dumps([{"text": "Hello"}]))
    assert load_instructions(lst)[0][0]["value"] == "Hello"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps("<image>\nWhat is this?") + "\n")
    with pytest.raises(ValueError, match="text-only.*<image>"):
        load_instructions(bad)
    bad.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(ValueError, match="item 1: needs a string 'prompt'"):
        load_instructions(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="not JSONL"):
        load_instructions(bad)


# -- PTGM ----------------------------------------------------------------------------------------------------------


def test_pseudo_captions_on_a_qa_task_reach_the_loss(overrides):
    ctx = make_ctx(overrides("ptgm", **{"data.train_limit": 8}))
    s = MoInCL(MoInCLOptions(ikd=False))
    own, out = at_task_1(ctx, s)
    extra = out[len(own):]
    assert out[: len(own)] == own and len(extra) == round(len(own) * 4 / 8) == 4
    assert s.pseudo_source == "caption" and {e.id for e in extra} == s.pseudo_ids
    caption_prompt = ctx.records["caption"]["train"][0].conversations[0]["value"]
    qa_media = {r.id: r.media for r in ctx.records["color_qa"]["train"]}
    queries = []
    for e in extra:
        src = e.id.split(":", 1)[1]
        assert e.media == qa_media[src] and e.task == "color_qa"  # the current task's inputs
        ids, labels = ctx.processor.encode([{"from": "human", "value": caption_prompt}, {"from": "gpt", "value": ""}],
                                     for_generation=True)
        assert e.input_ids[: len(ids)] == ids  # the caption prompt
        assert any(t != -100 for t in e.labels)
        from mmcl.data.records import Record

        queries.append(Record(e.id, [{"from": "human", "value": caption_prompt}, {"from": "gpt", "value": ""}], [],
                              e.media, "test"))
    # the answer is the teacher's own greedy caption
    answers = generate_answers(s.teacher, ctx.processor, ctx.collator(left_pad=True), queries, "color_qa", 2, 8,
                               ctx.device, ctx.dtype)
    for e, a in zip(extra, answers):
        want, _ = ctx.processor.encode([queries[0].conversations[0], {"from": "gpt", "value": a}])
        assert e.input_ids == want
    # a batch with the pseudo rows has a different task loss than without, and the CE on them is > 0
    ctx.model.train()
    real = next(ctx.batches(own[:4], 4))
    mixed = next(ctx.batches(own[:4] + extra, 8))
    with torch.no_grad():
        def mean_ce(batch):
            return token_cross_entropy_sum(ctx.forward(batch).logits, batch.labels) / int(
                (batch.labels[:, 1:] != -100).sum())

        only = next(ctx.batches(extra, 4))
        assert token_cross_entropy_sum(ctx.forward(only).logits, only.labels).item() > 0
        assert not math.isclose(mean_ce(real).item(), mean_ce(mixed).item(), rel_tol=1e-6)
    # deterministic: regenerated identically at the next task start (boundary resume)
    s2 = MoInCL(MoInCLOptions(ikd=False))
    _, out2 = at_task_1(make_ctx(overrides("ptgm2", **{"data.train_limit": 8})), s2)
    assert [(e.id, e.input_ids) for e in out2] == [(e.id, e.input_ids) for e in out]


def test_pseudo_qa_on_a_caption_task_after_qa(overrides):
    ctx = make_ctx(overrides("ptgm-qa", tasks=("color_qa", "caption"), **{"data.train_limit": 8}))
    s = MoInCL(MoInCLOptions(ikd=False, pseudo_num=2))
    own, out = at_task_1(ctx, s)
    extra = out[len(own):]
    assert len(extra) == 2 and s.pseudo_source == "color_qa"
    questions = {r.conversations[0]["value"] for r in ctx.records["color_qa"]["train"]}
    cap_media = {r.id: r.media for r in ctx.records["caption"]["train"]}
    for e in extra:
        assert e.media == cap_media[e.id.split(":", 1)[1]]
        prompt = ctx.tokenizer.decode(e.input_ids)
        assert any(q.split("\n", 1)[1].split("\n")[0] in prompt for q in questions)


def test_no_pseudo_examples_when_off_or_without_a_matching_earlier_task(overrides):
    ctx = make_ctx(overrides("off", **{"data.train_limit": 8}))
    s = MoInCL(MoInCLOptions(pseudo=False, ikd=False))
    own, out = at_task_1(ctx, s)
    assert out == own and not s.pseudo_ids
    ctx = make_ctx(overrides("nomatch", tasks=("color_qa", "shape_cls"), **{"data.train_limit": 8}))
    s = MoInCL(MoInCLOptions(ikd=False))
    own, out = at_task_1(ctx, s)
    assert out == own and not s.pseudo_ids and s.teacher is not None  # QA after QA: PTGM makes nothing


# -- the KD terms --------------------------------------------------------------------------------------------------


def loss_terms(ctx, s: MoInCL, batch):
    batch = s.transform_batch(ctx, batch)
    out = ctx.forward(batch)
    return batch, out, s.extra_loss(ctx, batch, out)


def ikd_alone_vs_appended(ctx, s: MoInCL, batch):
    """(IKD term as extra_loss computes it on `batch` with the rows appended, the same KL computed directly on the
    sampled instructions alone: student and teacher without media, over every non-pad position)."""
    s._micro = (-1, 0)
    chosen = s.ikd_examples(ctx)
    s._micro = (-1, 0)  # let transform_batch draw the same sample
    alone = next(ctx.batches(chosen, len(chosen)))
    assert alone.media == [{}] * len(alone)
    lab = torch.full_like(alone.attention_mask, -100)
    lab = torch.cat([lab, lab[:, :1]], 1)
    lab[:, 1:] = torch.where(alone.attention_mask == 1, 0, -100)
    pad = torch.zeros_like(ctx.forward(alone).logits[:, :1])
    s_logits = torch.cat([ctx.forward(alone).logits, pad], 1)
    t_logits = torch.cat([ctx.forward(alone, model=s.teacher).logits, pad], 1)
    want = distillation_loss(s_logits, t_logits, lab, s.config.temperature)
    _, _, got = loss_terms(ctx, s, batch)
    return got, want


def test_kd_terms_zero_at_the_snapshot_positive_after_a_perturbation(overrides):
    ctx = make_ctx(overrides("kd", **{"data.train_limit": 8}))
    s = MoInCL()
    own, out = at_task_1(ctx, s)
    ctx.model.train()
    batch = next(ctx.batches(own[:4] + out[len(own):], 8))
    widened, _, extra = loss_terms(ctx, s, batch)
    assert sum(i.startswith(IKD_PREFIX) for i in widened.ids) == 4  # text_instruct_num rows appended
    assert (widened.labels[8:] == -100).all()  # no CE on the instruction rows
    assert abs(extra.item()) < 1e-6
    with torch.no_grad():
        for _, p in ctx.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, _, extra = loss_terms(ctx, s, batch)
    assert extra.item() > 1e-4
    extra.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in ctx.trainable_parameters())
    assert all(p.grad is None for p in s.teacher.parameters())


def test_each_kd_term_on_its_own_matches_a_direct_computation(overrides):
    ctx = make_ctx(overrides("parts", **{"data.train_limit": 8}))
    both = MoInCL(MoInCLOptions(lambda_kl=0.5))
    own, out = at_task_1(ctx, both)
    pseudo = out[len(own):]
    with torch.no_grad():
        for _, p in ctx.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ctx.model.eval()
    batch = next(ctx.batches(own[:4] + pseudo, 8))
    ctx.task_step = 3
    with torch.no_grad():
        # KD only (ikd=false): λ·KD over the pseudo rows' supervised positions
        kd_only = MoInCL(MoInCLOptions(lambda_kl=0.5, ikd=False))
        kd_only.teacher, kd_only.pseudo_ids = both.teacher, both.pseudo_ids
        b1, o1, e1 = loss_terms(ctx, kd_only, batch)
        assert b1 is batch or b1.input_ids.shape == batch.input_ids.shape  # nothing appended
        rows = slice(4, 8)
        want = 0.5 * distillation_loss(o1.logits[rows], ctx.forward(batch, model=both.teacher).logits[rows],
                                       batch.labels[rows], 5.0)
        assert e1.item() == pytest.approx(want.item(), rel=1e-5) and want.item() > 0
        # IKD only (pseudo=false): the KL of the text-only instructions run alone, without media
        ikd_only = MoInCL(MoInCLOptions(pseudo=False))
        ikd_only.teacher, ikd_only._ikd_examples = both.teacher, both._ikd_examples
        e2, want_ikd = ikd_alone_vs_appended(ctx, ikd_only, batch)
        assert e2.item() == pytest.approx(want_ikd.item(), rel=1e-4) and want_ikd.item() > 0
        # both: the sum; a new micro-batch draws other instructions
        both._micro = (-1, 0)
        _, _, e3 = loss_terms(ctx, both, batch)
        assert e3.item() == pytest.approx(e1.item() + e2.item(), rel=1e-4)
        # both off: no term at all
        none = MoInCL(MoInCLOptions(pseudo=False, ikd=False))
        none.teacher = both.teacher
        assert none.transform_batch(ctx, batch) is batch and none.extra_loss(ctx, batch, o1) is None
    ids = [[e.id for e in both.ikd_examples(ctx)] for _ in range(3)]
    assert ids[0] != ids[1] or ids[1] != ids[2]


def test_ikd_instructions_longer_than_the_batch(overrides, tmp_path):
    inst = tmp_path / "long.jsonl"
    inst.write_text("\n".join(json.dumps(" ".join(["please add the numbers"] * (20 + i))) for i in range(5)) + "\n")
    ctx = make_ctx(overrides("long", **{"data.train_limit": 8}))
    s = MoInCL(MoInCLOptions(pseudo=False, instructions=str(inst), text_instruct_num=2))
    own, _ = at_task_1(ctx, s)
    with torch.no_grad():
        for _, p in ctx.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        batch = next(ctx.batches(own[:2], 2))
        assert max(len(e.input_ids) for e in s._ikd_examples) > batch.input_ids.shape[1]
        got, want = ikd_alone_vs_appended(ctx, s, batch)
    assert got.item() == pytest.approx(want.item(), rel=1e-4) and want.item() > 0


@pytest.mark.parametrize("every", ["epoch", "task"])
def test_fusion_blends_the_language_model_with_the_teacher(overrides, every):
    """θ ← (1−α)·θ_old + α·θ on the language model only, after each epoch (P4's code) or once at the task's end."""
    ctx = make_ctx(overrides("fuse", **{"data.train_limit": 8}))
    s = MoInCL(MoInCLOptions(pseudo=False, ikd=False, fusion_alpha=0.25, fusion_every=every))
    at_task_1(ctx, s)
    old = {n: p.detach().clone() for n, p in ctx.trainable_parameters()}
    lm = [n for n in old if n.startswith("language_model.")]
    assert lm and len(lm) < len(old)

    def moved_by(offset: float) -> None:  # θ = θ_old + offset·1 before the hook under test
        with torch.no_grad():
            for n, p in ctx.trainable_parameters():
                p.copy_(old[n] + offset)

    def check(lm_offset: float, other_offset: float) -> None:
        for n, p in ctx.trainable_parameters():
            assert torch.allclose(p, old[n] + (lm_offset if n in lm else other_offset), atol=1e-6), n

    moved_by(1.0)
    s.on_epoch_end(ctx)
    check(0.25, 1.0) if every == "epoch" else check(1.0, 1.0)
    moved_by(2.0)  # a second epoch fuses again, always towards the previous-task model
    s.on_epoch_end(ctx)
    check(0.5, 2.0) if every == "epoch" else check(2.0, 2.0)
    s.on_task_end(ctx)
    check(0.5, 2.0) if every == "epoch" else check(0.5, 2.0)
    assert s.teacher is None


def test_p4_order1_recipe_sets_its_per_step_table(micro_world):
    """configs/micl/order1_moincl_p4.yaml: fusion 0.1 then 0.5, pseudo_num 4/1/4 and λ_KL 1.0/0.5/0.1 on the
    three steps that make pseudo targets, keyed by task names of the MICL stream."""
    recipe = Path(__file__).parent.parent / "configs" / "micl" / "order1_moincl_p4.yaml"
    s, = build_strategies(load_config(recipe).strategies)
    tasks = yaml.safe_load((micro_world / "streams" / "micl1.yaml").read_text())["tasks"]
    names = [Path(t).name for t in tasks]
    table = []
    for name in names:
        s.use_task(name)
        table.append((name, s.config.fusion_alpha, s.config.pseudo_num, s.config.lambda_kl, s.config.fusion_every))
    assert table == [
        ("audio_cap", 0.1, 4, 1.0, "epoch"), ("image_cap", 0.1, 4, 1.0, "epoch"), ("video_qa", 0.1, 4, 1.0, "epoch"),
        ("audio_qa", 0.1, 4, 1.0, "epoch"), ("image_qa", 0.5, 1, 0.5, "epoch"), ("video_cap", 0.5, 4, 0.1, "epoch"),
    ]


def test_ikd_default_pool_is_the_builtin_instruction_set_not_the_retention_tasks(overrides, micro_world, tmp_path):
    from mmcl.data.synth.instructions import instruction_pool

    ctx = make_ctx(overrides("inst"))  # the stream has the lang_arith retention task
    s = MoInCL()
    s.prepare_model(ctx)
    assert [c[0]["value"] for c in s._instructions] == instruction_pool()
    retention = {r.conversations[0]["value"] for r in ctx.records["lang_arith"]["test"]}
    assert not retention & {c[0]["value"] for c in s._instructions}
    path = tmp_path / "no-retention.yaml"  # a stream without any text task: the same pool
    path.write_text(yaml.safe_dump({"name": "x", "tasks": [str(micro_world / "tasks" / t) for t in
                                                            ("caption", "color_qa")]}))
    other = MoInCL()
    other.prepare_model(make_ctx(overrides("noinst") + [f"data.stream={path}"]))
    assert other._instructions == s._instructions


# -- through the engine --------------------------------------------------------------------------------------------


def fast_engine(monkeypatch) -> None:
    import gc

    monkeypatch.setattr(mmcl.report, "write_report", lambda run_dir: None)
    monkeypatch.setattr(gc, "collect", lambda *a, **k: 0)


def test_end_to_end_two_tasks_and_both_off_equals_sequential(overrides, monkeypatch, tmp_path):
    fast_engine(monkeypatch)
    seen: list[str] = []
    original = MoInCL.extra_loss

    def spy(self, ctx, batch, outputs):
        seen.extend(batch.ids)
        return original(self, ctx, batch, outputs)

    monkeypatch.setattr(MoInCL, "extra_loss", spy)
    inst = tmp_path / "inst.jsonl"
    inst.write_text("\n".join(json.dumps(f"Say {i} and {i} again.") for i in range(6)) + "\n")
    built: list = []
    monkeypatch.setattr(setup, "build_strategies", lambda specs: built.append(build_strategies(specs)) or built[-1])
    d = loop.run(load_config(None, overrides("e2e", strategies="[moincl]",
                                             **{"strategies.moincl.instructions": str(inst)})), **QUIET)
    losses = json.loads((d / "losses.json").read_text())
    assert list(losses) == ["caption", "color_qa"] and all(len(v) == 2 for v in losses.values())
    assert all(math.isfinite(x) for v in losses.values() for x in v)
    matrix = json.loads((d / "matrix.json").read_text())
    assert len(matrix["rows"]) == 3
    s = built[-1][0]
    assert s.pseudo_ids and set(seen) & s.pseudo_ids  # pseudo examples were consumed by training batches
    assert any(i.startswith(IKD_PREFIX) for i in seen)

    # both parts off: exactly sequential fine-tuning
    monkeypatch.setattr(loop, "evaluate_row", lambda ctx, row, progress: {t.name: 0.0 for t in ctx.stream.tasks})
    off = loop.run(load_config(None, overrides("off", strategies="[moincl]", **{
        "strategies.moincl.pseudo": "false", "strategies.moincl.ikd": "false"})), **QUIET)
    seq = loop.run(load_config(None, overrides("seq", strategies="[sequential]")), **QUIET)
    assert json.loads((off / "losses.json").read_text()) == json.loads((seq / "losses.json").read_text())
    assert json.loads((off / "losses.json").read_text())["color_qa"] != losses["color_qa"]


def test_ikd_pseudo_mode_trains_on_the_teachers_answers(overrides):
    """P4's alternative IKD: the previous model answers each sampled instruction (greedy, once per instruction) and
    the term is the mean cross-entropy of the current model on those answers; the rows stay out of the task loss."""
    ctx = make_ctx(overrides("ikd-pseudo", **{"data.train_limit": 8}))
    s = MoInCL(MoInCLOptions(pseudo=False, ikd_mode="pseudo", text_instruct_num=3, ikd_max_new_tokens=6))
    own, _ = at_task_1(ctx, s)
    ctx.model.eval()
    batch = next(ctx.batches(own[:4], 4))
    with torch.no_grad():
        widened, out, term = loss_terms(ctx, s, batch)
        rows = [i for i, x in enumerate(widened.ids) if x.startswith(IKD_PREFIX)]
        assert len(rows) == 3 and (widened.labels[rows] == -100).all()
        # by hand: the teacher's greedy answers, encoded as targets, scored by the current model alone
        index = [int(widened.ids[r].rsplit("-", 1)[1]) for r in rows]
        queries = [Record(f"q{i}", s._instructions[i], [], {}, "x") for i in index]
        answers = generate_answers(s.teacher, ctx.processor, ctx.collator(left_pad=True), queries, "x", 6, 8, ctx.device,
                                   ctx.dtype)
        alone = [Example(f"a{i}", *ctx.processor.encode([*q.conversations, {"from": "gpt", "value": a}]), {}, "x")
                 for i, q, a in zip(index, queries, answers)]
        direct = next(ctx.batches(alone, len(alone)))
        n = int((direct.labels[:, 1:] != -100).sum())
        want = token_cross_entropy_sum(ctx.forward(direct).logits, direct.labels) / n
        assert n > 0 and term.item() == pytest.approx(want.item(), rel=1e-4)
    # a teacher that equals the student still gives a positive CE (unlike the KL mode's 0), and it trains the model
    ctx.model.train()
    _, _, term = loss_terms(ctx, s, batch)
    assert term.item() > 0
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in ctx.trainable_parameters())
    assert len(s._ikd_answered) >= 3  # answers are cached per instruction for the task
