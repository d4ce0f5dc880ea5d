"""The P1 and P2 strategies: soft targets, layer freezing (OLF/OOLF), rehearsal, fixed EMA, LLaCA's adaptive
EMA and IA3. Pure functions against values worked out by hand; hooks on the micro model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from support import engine_objects
from torch import nn

from mmcl.config import StrategySpec
from mmcl.engine.hooks import StrategyError
from mmcl.engine.train import fit
from mmcl.models.losses import token_cross_entropy_sum
from mmcl.strategies import build_strategies
from mmcl.strategies.ema import EMA, EMAOptions
from mmcl.strategies.freeze import decoder_layers
from mmcl.strategies.ia3 import IA3Options
from mmcl.strategies.llaca import LLaCA, LLaCAOptions, ema_weight
from mmcl.strategies.rehearsal import RehearsalOptions, rehearsal_count
from mmcl.strategies.soft_targets import SoftTargetsOptions, soft_target_loss_sum


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _objects(micro_overrides, strategies: str, tasks: int = 2, **extra):
    return engine_objects(micro_overrides("p", tasks=tasks, strategies=strategies, **extra))


# -- options ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, option", [
    (lambda: SoftTargetsOptions(alpha=1.0), "strategies.soft_targets.alpha"),
    (lambda: SoftTargetsOptions(alpha=-0.1), "strategies.soft_targets.alpha"),
    (lambda: RehearsalOptions(fraction=1.5), "strategies.rehearsal.fraction"),
    (lambda: EMAOptions(beta=1.0), "strategies.ema.beta"),
    (lambda: EMAOptions(beta=0.0), "strategies.ema.beta"),
    (lambda: LLaCAOptions(k=0.0), "strategies.llaca.k"),
    (lambda: LLaCAOptions(base=1.0), "strategies.llaca.base"),
    (lambda: IA3Options(targets=["q_proj"], feedforward=["down_proj"]), "strategies.ia3.feedforward"),
])
def test_bad_options_name_the_option(make, option):
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        make()


def test_options_are_checked_when_built_from_the_config():
    with pytest.raises(ValueError, match=r"strategies\.ema\.beta must be in \(0, 1\)"):
        build_strategies([StrategySpec("ema", {"beta": 1.5})])


# -- soft targets -----------------------------------------------------------------------------------------------------


def test_soft_target_loss_by_hand():
    # Sequence 0: position 0 predicts label[1] = 1 with logits [0, ln 2, 0] -> p = [1/4, 1/2, 1/4].
    # alpha = 0.1, V = 3: target [0.05, 0.9, 0.05]; loss = -(0.05 ln 1/4 + 0.9 ln 1/2 + 0.05 ln 1/4)
    #   = 0.1 ln 4 + 0.9 ln 2 = 1.1 ln 2. The last position predicts nothing (shift); sequence 1 is all -100.
    logits = torch.tensor([[[0.0, math.log(2), 0.0], [5.0, -3.0, 1.0]],
                           [[9.0, 1.0, 2.0], [0.5, 0.5, 7.0]]], requires_grad=True)
    labels = torch.tensor([[-100, 1], [-100, -100]])
    loss = soft_target_loss_sum(logits, labels, 0.1)
    assert loss.item() == pytest.approx(1.1 * math.log(2), rel=1e-6)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0, 1].abs().sum() == 0  # unsupervised: no gradient


def test_soft_target_loss_matches_explicit_soft_targets_and_plain_ce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = -100
    labels[2, 4] = -100
    alpha = 0.2
    # explicit (N, V) targets, as P1's code builds them
    lg, tg = logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)
    keep = tg != -100
    target = torch.full((int(keep.sum()), 11), alpha / 10)
    target[torch.arange(len(target)), tg[keep]] = 1 - alpha
    expected = F.cross_entropy(lg[keep], target, reduction="sum")
    assert soft_target_loss_sum(logits, labels, alpha).item() == pytest.approx(expected.item(), rel=1e-5)
    assert soft_target_loss_sum(logits, labels, 0.0).item() == pytest.approx(
        token_cross_entropy_sum(logits, labels).item(), rel=1e-5)


def test_soft_target_loss_averaged_over_all_positions_is_p1s_form():
    # The by-hand batch above: one supervised position out of B·(T−1) = 2·1 = 2 positions. P1's mean over all
    # positions is 1.1 ln 2 / 2; the engine divides the task loss by the supervised count (1), so the strategy
    # hands it 1.1 ln 2 · 1/2. With the supervised default it hands 1.1 ln 2 (mean over the answer token).
    from mmcl.strategies.soft_targets import SoftTargets, all_positions_scale

    logits = torch.tensor([[[0.0, math.log(2), 0.0], [5.0, -3.0, 1.0]],
                           [[9.0, 1.0, 2.0], [0.5, 0.5, 7.0]]])
    labels = torch.tensor([[-100, 1], [-100, -100]])
    assert all_positions_scale(labels) == 0.5
    batch, out = SimpleNamespace(labels=labels), SimpleNamespace(logits=logits)
    sup = SoftTargets(SoftTargetsOptions(alpha=0.1)).task_loss(None, batch, out)
    every = SoftTargets(SoftTargetsOptions(alpha=0.1, average="all")).task_loss(None, batch, out)
    assert sup.item() == pytest.approx(1.1 * math.log(2), rel=1e-6)
    assert every.item() / 1 == pytest.approx(1.1 * math.log(2) / 2, rel=1e-6)  # engine: / 1 supervised token
    # against PyTorch's cross-entropy with probability targets over every position (P1's code): unsupervised
    # positions get an all-zero target, and the mean divides by all B·(T−1) rows
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[:, :2] = -100
    labels[1, 3:] = -100
    tg = labels[:, 1:].reshape(-1)
    target = torch.zeros(len(tg), 7)
    keep = tg != -100
    target[keep] = 0.2 / 6
    target[keep.nonzero().squeeze(1), tg[keep]] = 0.8
    p1 = F.cross_entropy(logits[:, :-1].reshape(-1, 7), target)  # reduction mean over all 12 rows
    n_sup = int(keep.sum())
    got = SoftTargets(SoftTargetsOptions(alpha=0.2, average="all")).task_loss(
        None, SimpleNamespace(labels=labels), SimpleNamespace(logits=logits)) / n_sup  # the engine's division
    assert got.item() == pytest.approx(p1.item(), rel=1e-5)
    with pytest.raises(ValueError, match="average must be 'supervised' or 'all'"):
        SoftTargetsOptions(average="tokens")


# -- freezing ---------------------------------------------------------------------------------------------------------


def _train_one_step(ctx) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    ctx.task_index = 0
    examples = ctx.train_examples(ctx.task.name)[:4]
    cfg = ctx.config.train
    cfg.batch_size, cfg.max_steps = 4, 1
    fit(ctx.model, examples, ctx.collator(), cfg, ctx.accelerator, seed=0, progress=False)
    return before


def test_freeze_last_block_keeps_it_bitwise_and_trains_the_rest(micro_overrides):
    ctx, _ = _objects(micro_overrides, "[freeze_last_block]")
    last = decoder_layers(ctx.model.language_model)[-1]
    frozen = {id(p) for p in last.parameters()}
    assert frozen and all(not p.requires_grad for p in last.parameters())
    before = _train_one_step(ctx)
    for n, p in ctx.model.named_parameters():
        if id(p) in frozen:
            assert torch.equal(p, before[n]), n
        elif p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} did not train"
    assert any(p.requires_grad for p in decoder_layers(ctx.model.language_model)[0].parameters())


def test_freeze_output_embedding_freezes_the_tied_input_embedding_too(micro_overrides):
    ctx, _ = _objects(micro_overrides, "[freeze_output_embedding]")
    lm = ctx.model.language_model
    head, embed = lm.get_output_embeddings().weight, lm.get_input_embeddings().weight
    assert head is embed  # the tiny Llama ties them: freezing one freezes both
    before = _train_one_step(ctx)
    name = next(n for n, p in ctx.model.named_parameters() if p is head)  # listed once, as embed_tokens
    assert not head.requires_grad and torch.equal(head, before[name])
    assert any(not torch.equal(p, before[n]) for n, p in ctx.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("order, mode", [("[lora,freeze_last_block]", "carry"), ("[freeze_last_block,lora]", "merge")])
def test_freeze_last_block_freezes_adapters_whatever_the_order(micro_overrides, order, mode):
    ctx, strategies = _objects(micro_overrides, order, **{"strategies.lora.mode": mode})
    ctx.task_index = 0
    strategies.on_task_start(ctx)
    for s in strategies:  # the last hooks before the optimizer is built
        s.train_examples(ctx, [])
    last = decoder_layers(ctx.model.language_model)[-1]
    first = decoder_layers(ctx.model.language_model)[0]
    assert any("lora_A" in n for n, _ in last.named_parameters())
    assert not any(p.requires_grad for p in last.parameters())
    assert any(p.requires_grad for n, p in first.named_parameters() if "lora_" in n)


# -- rehearsal --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, p, k", [(100, 0.01, 1), (24, 0.25, 6), (10, 0.0, 0), (3, 0.01, 1), (10, 1.0, 10),
                                     (250, 0.01, 3), (0, 0.5, 0), (1000, 0.001, 1)])
def test_rehearsal_count(n, p, k):
    assert rehearsal_count(n, p) == k


def test_rehearsal_adds_a_seeded_fraction_of_every_earlier_task(micro_overrides):
    ctx, (reh,) = _objects(micro_overrides, "[rehearsal]", tasks=3, **{"strategies.rehearsal.fraction": 0.25})
    ctx.task_index = 0
    own = ctx.train_examples(ctx.task.name)
    assert reh.train_examples(ctx, own) == own  # nothing earlier
    ctx.task_index = 2
    own = ctx.train_examples(ctx.task.name)
    out = reh.train_examples(ctx, own)
    n = {t.name: len(ctx.train_examples(t.name)) for t in ctx.stream.tasks}
    assert n == {"color_qa": 24, "shape_cls": 24, "count": 24}
    assert out[: len(own)] == own
    by_task = [e.task for e in out[len(own):]]
    assert by_task.count("color_qa") == 6 and by_task.count("shape_cls") == 6 and len(by_task) == 12
    assert len({e.id for e in out[len(own):]}) == 12  # without replacement
    again = reh.train_examples(ctx, own)
    assert [e.id for e in again] == [e.id for e in out]  # same (seed, task): same draw, so resume is exact
    ctx.config.seed = 1
    assert [e.id for e in reh.train_examples(ctx, own)] != [e.id for e in out]


# -- EMA --------------------------------------------------------------------------------------------------------------


def _fake_ctx(*shapes):
    model = nn.Module()
    for i, s in enumerate(shapes):
        model.register_parameter(f"w{i}", nn.Parameter(torch.zeros(s)))
    return SimpleNamespace(model=model, run_dir=None)


def test_ema_by_hand_and_swap_at_task_end():
    ctx = _fake_ctx(2)
    ema = EMA(EMAOptions(beta=0.9))
    ema.on_task_start(ctx)
    w = ctx.model.w0
    for value in ([1.0, 2.0], [3.0, 4.0], [0.0, 0.0]):
        w.data = torch.tensor(value)
        ema.after_optimizer_step(ctx)
    # step 1: ema = [1, 2]; step 2: 0.9·[1, 2] + 0.1·[3, 4] = [1.2, 2.2]; step 3: 0.9·[1.2, 2.2] = [1.08, 1.98]
    tensors, _ = ema.state_dict()
    assert torch.allclose(tensors["ema/w0"], torch.tensor([1.08, 1.98]))
    ema.on_task_end(ctx)
    assert torch.allclose(w, torch.tensor([1.08, 1.98]))
    ema.on_task_start(ctx)
    assert ema.state_dict() == ({}, {})


def test_ema_state_restored_mid_task_continues_identically():
    ctx_a, ctx_b = _fake_ctx(3, (2, 2)), _fake_ctx(3, (2, 2))
    a = EMA(EMAOptions(beta=0.8))
    a.on_task_start(ctx_a)
    for step in range(2):
        for p in ctx_a.model.parameters():
            p.data += step + 1.0
        a.after_optimizer_step(ctx_a)
    b = EMA(a.config)
    b.load_state_dict(*a.state_dict())
    ctx_b.model.load_state_dict(ctx_a.model.state_dict())
    for ctx, s in ((ctx_a, a), (ctx_b, b)):
        for p in ctx.model.parameters():
            p.data *= 3
        s.after_optimizer_step(ctx)
    ta, tb = a.state_dict()[0], b.state_dict()[0]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# -- LLaCA ------------------------------------------------------------------------------------------------------------

THETA, THETA_STAR = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])  # ||theta - theta*||_1 = 3
G, G_PREV = torch.tensor([0.5, -0.5]), torch.tensor([0.0, 0.0])  # ||g||_1 = 1, ||g - g_prev||_1 = 1


def test_ema_weight_by_hand():
    # alpha = K(1 + ||g||_1) / (||theta - theta*||_1 · ||g - g_prev||_1) = 0.1 · 2 / (3 · 1) = 0.0667
    assert ema_weight(THETA, THETA_STAR, G, G_PREV, 0.1, 0.01) == pytest.approx(0.2 / 3)
    # g_prev = [1, 1]: ||g - g_prev||_1 = 0.5 + 1.5 = 2 -> alpha = 0.1 · 2 / (3 · 2) = 0.0333
    assert ema_weight(THETA, THETA_STAR, G, torch.tensor([1.0, 1.0]), 0.1, 0.01) == pytest.approx(0.1 / 3)


@pytest.mark.parametrize("case, args", [
    ("alpha >= 1: 2 · 2 / 3 = 1.33", (THETA, THETA_STAR, G, G_PREV, 2.0)),
    ("alpha = 1 exactly: 1.5 · 2 / 3", (THETA, THETA_STAR, G, G_PREV, 1.5)),
    ("K < 0: alpha < 0", (THETA, THETA_STAR, G, G_PREV, -0.1)),
    ("no previous gradient (first step)", (THETA, THETA_STAR, G, None, 0.1)),
    ("no gradient", (THETA, THETA_STAR, None, G_PREV, 0.1)),
    ("zero gap theta = theta*", (THETA, THETA.clone(), G, G_PREV, 0.1)),
    ("zero gradient difference", (THETA, THETA_STAR, G, G.clone(), 0.1)),
    ("NaN gradient", (THETA, THETA_STAR, torch.tensor([float("nan"), 0.0]), G_PREV, 0.1)),
    ("inf gradient", (THETA, THETA_STAR, torch.tensor([float("inf"), 0.0]), G_PREV, 0.1)),
])
def test_ema_weight_falls_back_to_base(case, args):
    assert ema_weight(*args, base=0.01) == 0.01, case


def _reference_llaca(params_per_step, grads_per_step, k, base):
    """Per tensor, with ema_weight: the rule exactly as papers.md writes it."""
    ema, prev = None, None
    for thetas, grads in zip(params_per_step, grads_per_step):
        if ema is None:
            ema = [t.clone() for t in thetas]
            prev = [None] * len(thetas)
        for i, (t, g) in enumerate(zip(thetas, grads)):
            a = ema_weight(t, ema[i], g, prev[i], k, base)
            ema[i] = (1 - a) * ema[i] + a * t
            if g is not None:
                prev[i] = g.clone()
    return ema, prev


def test_llaca_batched_update_matches_the_reference_with_one_host_sync_per_step(monkeypatch):
    shapes = [(3,), (2, 4), (5,)]
    ctx = _fake_ctx(*shapes)
    params = list(ctx.model.parameters())
    gen = torch.Generator().manual_seed(0)
    thetas_seq, grads_seq = [], []
    for step in range(4):
        thetas_seq.append([torch.randn(s, generator=gen) for s in shapes])
        grads = [torch.randn(s, generator=gen) * (0.01 if step % 2 else 1.0) for s in shapes]
        grads[2] = None  # a trainable tensor that got no gradient
        grads_seq.append(grads)
    k, base = 0.05, 0.01
    ema_ref, prev_ref = _reference_llaca(thetas_seq, grads_seq, k, base)

    syncs = {"tolist": 0, "item": 0}
    for name in syncs:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name):
            syncs[_name] += 1
            return _real(self, *a)

        monkeypatch.setattr(torch.Tensor, name, counted)
    s = LLaCA(LLaCAOptions(k=k, base=base))
    s.on_task_start(ctx)
    for step, (thetas, grads) in enumerate(zip(thetas_seq, grads_seq)):
        for p, t, g in zip(params, thetas, grads):
            p.data, p.grad = t.clone(), None if g is None else g.clone()
        syncs.update(tolist=0, item=0)
        s.after_optimizer_step(ctx)
        assert syncs == {"tolist": 0 if step == 0 else 1, "item": 0}
    tensors, _ = s.state_dict()
    for i in range(3):
        assert torch.allclose(tensors[f"ema/w{i}"], ema_ref[i], atol=1e-6)
    assert torch.equal(tensors["prev_grad/w0"], prev_ref[0]) and "prev_grad/w2" not in tensors
    # the adaptive weight was used (not only the fallback): the EMA differs from a fixed-base EMA
    fixed, _ = _reference_llaca(thetas_seq, [[None] * 3] * 4, k, base)
    assert not torch.allclose(tensors["ema/w0"], fixed[0])


def test_llaca_refuses_to_follow_a_merged_adapter(micro_overrides):
    # task ends unwind in reverse: with [llaca, lora] the adapter is merged before llaca swaps its weights in
    ctx, strategies = _objects(micro_overrides, "[llaca,lora]", **{"strategies.lora.mode": "merge"})
    ctx.task_index = 0
    strategies.on_task_start(ctx)
    for _, p in ctx.trainable_parameters():
        p.grad = torch.ones_like(p)
    strategies.after_optimizer_step(ctx)
    with pytest.raises(StrategyError, match="list lora before llaca"):
        strategies.on_task_end(ctx)


# -- IA3 --------------------------------------------------------------------------------------------------------------


def test_ia3_scales_every_linear_layer_of_the_language_model_only(micro_overrides):
    ctx, _ = _objects(micro_overrides, "[ia3]")
    trainable = dict(ctx.trainable_parameters())
    lm_trainable = [n for n in trainable if n.startswith("language_model.")]
    assert lm_trainable and all("ia3_l" in n for n in lm_trainable)
    assert all(n.startswith(("language_model.", "projectors.")) for n in trainable)
    kinds = {n.split(".ia3_l")[0].rsplit(".", 1)[-1] for n in lm_trainable}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    modules = dict(ctx.model.language_model.named_modules())
    for n in lm_trainable:
        layer = modules[n.removeprefix("language_model.").split(".ia3_l")[0]]
        shape = tuple(trainable[n].shape)
        # feed-forward (down_proj) scales its input, the others their output
        assert shape == ((1, layer.in_features) if n.split(".ia3_l")[0].endswith("down_proj")
                         else (layer.out_features, 1)), n
