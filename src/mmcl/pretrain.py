"""`mmcl pretrain`: build the tiny base model the built-in stream starts from.

Three stages. (0) The tiny vision tower has no pretrained weights to borrow (a real LLaVA starts from CLIP), so it
first learns to predict the words of each alignment caption from its pooled features (a multi-label bag of words,
as in Joulin et al. 2016, "Learning Visual Features from Large Weakly Supervised Data"); the linear head is then
discarded. On the built-in world stage 0 draws new alignment images from the world's own generator at every step,
as CLIP sees each of its web images about once (on the world's 4,800 files the tower memorises them and tells
held-out shapes apart 73 % of the time; on new draws 91 %, docs/world.md); a draw whose pixels equal a test image of
the world is skipped (and an alignment or instruction record equal to a test record of the world is left out,
`leave_out_tests`). Then, as in the LLaVA recipe seen as continual learning (P1): (1) the language model learns the
world's language skills (text only); (2) vision-language alignment on image captions (LLaVA stage 1). Unlike a real LLM,
the tiny language model has never seen caption language, so stage 2 trains the projector and the language model
together (the image tower stays frozen after stage 0, as CLIP is in LLaVA; the audio tower trains), with
the language-skill records mixed in so the skills are kept. The alignment captions name colours, classes, places,
counts, written words and boxes (docs/world.md), so the stream's tasks ask for what the base has seen described.
The model's scores on the language skills are saved with it, so a user can see it has skills to lose.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import torch
from accelerate import Accelerator

from mmcl.base_tuning import clean_records, save_base, tune_base
from mmcl.config import TrainConfig
from mmcl.data.batching import Collator, MediaLoader, encode_records
from mmcl.data.records import Task, load_task
from mmcl.data.synth.world import FORMAT
from mmcl.engine.train import fit
from mmcl.eval.generate import evaluate_task
from mmcl.models.composition import composition_processor
from mmcl.models.tiny import TinySizes, build_tiny
from mmcl.models.tokenizer import ASSISTANT, USER, train_bpe_tokenizer

_DATA = "pre-training data"
BASE_RECIPE = 3
"""Version of the recipe below, saved in pretrain.json: a cached base model of another recipe is rebuilt
(`mmcl.builtin.builtin_model`). 2: stage 0 on freshly drawn alignment images; 3: stage 1 16 epochs at lr 2e-3,
stage 2 3 epochs, a 3-layer image tower (`TinySizes.vision_layers`)."""
VISION_SOURCES = ("generate", "files")
Draw = Callable[[int], tuple[torch.Tensor, list[str]]]
"""Stage 0's data: batch size -> (images as the tower's input, their captions)."""


@dataclass
class PretrainConfig:
    seed: int = 0
    vocab_size: int = 1024
    sizes: TinySizes = field(default_factory=TinySizes)
    vision_steps: int = 6000
    """Stage 0 steps (batch 32, one-cycle lr peaking at `vision_lr`); 0 skips it (e.g. for a pretrained tower). A
    tower from scratch tells colours apart within a few hundred steps but shapes only after thousands, on new images
    (on a few thousand fixed ones it memorises them); see docs/world.md."""
    vision_lr: float = 4e-3
    vision_source: str = "generate"
    """Stage 0's images: "generate" draws new alignment images from the built-in world's generator at every step (a
    world not written by mmcl falls back to its files); "files" reuses the world's alignment records."""
    language: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=16, batch_size=32, lr=2e-3, warmup_ratio=0.05))
    """Stage 1. The tiny LM's loss sits on a plateau (about 1.3) for a seed-dependent while before it drops: 8 epochs
    at 3e-3 leave some seeds on or near it (world data 4, seeds 0-3: final loss 0.18-1.36, arithmetic 17-78, word
    order 2-88); 16 at 2e-3 do not (0.015-0.08; 94-98, 99.5-100; docs/results/stage1_seeds.json)."""
    align: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, batch_size=32, lr=1e-3, warmup_ratio=0.05))
    """Stage 2. The audio tower learns only here: with the 2-layer image tower, audio QA reached 50.0 / 48.5 from
    pre-training seeds 0 / 1 at 2 epochs, 65.5 / 54.5 at 3 (docs/world.md, single-task ceilings)."""
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        if self.vision_source not in VISION_SOURCES:
            raise ValueError(f"PretrainConfig.vision_source must be one of {', '.join(VISION_SOURCES)}, "
                             f"got {self.vision_source!r}")


def pretrain_vision(model, draw: Draw, words: list[str], steps: int, *, batch_size: int = 32, lr: float = 2e-3,
                    progress: bool = True) -> float:
    """Stage 0: train the image tower to predict which of `words` its caption contains (the linear head is then
    discarded); `draw` gives each step's batch. Returns the final loss."""
    from tqdm.auto import tqdm

    encoder, spec = model.encoders["image"], model.modalities["image"]
    index = {w: k for k, w in enumerate(words)}
    head = torch.nn.Linear(encoder.config.hidden_size, len(words))
    params = list(encoder.parameters()) + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    # one-cycle: 5 % warm-up from lr/25, cosine to ~0 (a run of a few steps, as in tests, keeps lr constant)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05) if steps >= 40 \
        else None
    encoder.train()
    loss = torch.zeros(())
    for _ in tqdm(range(steps), desc="vision", leave=False, disable=not progress):
        images, captions = draw(batch_size)
        targets = torch.zeros(len(captions), len(words))
        for i, caption in enumerate(captions):
            for w in caption.lower().split():
                if w in index:
                    targets[i, index[w]] = 1.0
        feats = encoder(images).last_hidden_state
        feats = feats[:, 1:] if spec.select == "patch" else feats
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(feats.mean(1)), targets)
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def draw_from_files(records, media, seed: int) -> Draw:
    """Stage 0 batches drawn with replacement from captioned image records (their media through `media`)."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int):
        idx = torch.randint(0, len(records), (n,), generator=g).tolist()
        return (torch.stack([media("image", records[i].media["image"]).inputs["values"] for i in idx]),
                [records[i].answer for i in idx])
    return draw


def _pixels(im) -> bytes:
    return hashlib.sha1(im.convert("RGB").tobytes()).digest()


def world_test_pixels(world: Path) -> set[bytes]:
    """Fingerprints of the pixels of every test image of every task of `world`: what stage 0 must never see."""
    from mmcl.data.media import read_image
    from mmcl.data.synth.world import task_dirs

    seen: set[bytes] = set()
    for task_dir in task_dirs(world):
        task = load_task(task_dir)
        if "test" in task.splits:
            seen.update(_pixels(read_image(r.media["image"])) for r in clean_records(task, "test", "world")
                        if "image" in r.media)
    return seen


class GeneratedImages:
    """Stage 0 batches of new alignment images from the built-in world's generator (seeded by the world's seed and
    `seed`), normalised as the model's processor does. A draw whose pixels equal a test image of the world is
    skipped and counted in `skipped` (the written words, from a few positions, recur often)."""

    def __init__(self, world: Path, index: dict, spec, seed: int):
        from mmcl.data.synth.image_tasks import ALIGN_TASK

        self.generate = ALIGN_TASK.generate
        self.rng = random.Random(f"mmcl-world/{index['seed']}/vision-pretrain/{seed}")
        self.forbidden = world_test_pixels(world)
        self.size, self.spec, self.skipped = index["sizes"]["image_size"], spec, 0

    def __call__(self, n: int) -> tuple[torch.Tensor, list[str]]:
        from mmcl.data.media import normalise_image

        images, captions = [], []
        while len(images) < n:
            for sample in self.generate(self.rng, n - len(images), self.size):
                if _pixels(sample.image) in self.forbidden:
                    self.skipped += 1
                    continue
                images.append(normalise_image(sample.image, self.spec.image_size, self.spec.mean, self.spec.std))
                captions.append(sample.answer)
        return torch.stack(images), captions


def leave_out_tests(world: Path, tasks: list[Task], what: str, log=print) -> list[dict]:
    """The train records of `tasks` that are a test record of some task of `world` or of `tasks` (same normalised
    prompt and media, `mmcl.data.overlap`): a base trained on one would start a stream having seen a record it is
    scored on. Each as {"train": file:line, "test": task/id}, logged; the caller leaves them out. The language
    skills are not checked: their test questions are their training questions by design (docs/world.md)."""
    from mmcl.data.overlap import ExtraData, find_overlaps, index_tests
    from mmcl.data.synth.world import task_dirs

    tests = {}
    for task in [load_task(d) for d in task_dirs(world)] + list(tasks):
        if "test" in task.splits and task.name not in tests:
            tests[task.name] = clean_records(task, "test", what)
    train = [e for t in tasks for e in ExtraData.of_records(f"{t.name} train", clean_records(t, "train", what))]
    found = find_overlaps(index_tests(tests.items()), train)
    left_out = [{"train": o.source_at, "test": f"{o.task}/{o.record_id}"} for o in found]
    if left_out:
        log(f"{what}: left out {len(left_out)} training record(s) that are test records of the world (same prompt "
            "and media), listed in pretrain.json:\n" + "\n".join(f"  {o['train']} = {o['test']}" for o in left_out))
    return left_out


def instruction_tune(base: Path, world: Path, out: Path, tasks: list[str], cfg: TrainConfig | None = None, *,
                     seed: int = 0, progress: bool = True, log=print) -> Path:
    """P3's multi-task instruction-tuned base (InstructBLIP vs BLIP-2): `base` trained jointly on the world tasks
    `tasks` (which must not be the stream's), with the language skills mixed in as in alignment, saved to `out`.
    Records of `tasks` that are test records of the world are left out (listed in pretrain.json's `left_out`)."""
    cfg = cfg or TrainConfig(epochs=2, batch_size=32, lr=5e-4, warmup_ratio=0.05)
    world = Path(world)
    index = json.loads((world / "world.json").read_text())
    chosen = [load_task(world / "tasks" / t) for t in tasks]
    trained = chosen + [load_task(world / p) for p in index["pretrain"]["text"]]
    left_out = leave_out_tests(world, chosen, "instruction-tuning data", log)
    info = tune_base(base, trained, trained, out, cfg, parts=["projectors", "language_model"],
                     info={"instruct_tasks": tasks, "left_out": left_out}, what="instruction-tuning data",
                     label="instruct", seed=seed, eval_batch_size=128, leave_out={o["train"] for o in left_out},
                     progress=progress, log=log)
    log("instruction-tuned base scores: " + ", ".join(f"{k} {v:.1f}" for k, v in info["scores"].items()))
    return Path(out)


def pretrain(world: Path, out: Path, cfg: PretrainConfig | None = None, *, progress: bool = True, log=print) -> Path:
    """Train the tiny base on `world` and save it to `out` (written to a temporary directory, then renamed)."""
    cfg = cfg or PretrainConfig()
    world, out = Path(world), Path(out)
    index = json.loads((world / "world.json").read_text())
    t0 = time.perf_counter()
    from mmcl.data.synth import world_texts

    # the conversation template's words are in the corpus too, so they become single tokens
    tokenizer = train_bpe_tokenizer(chain(world_texts(world), [f"{USER} {ASSISTANT}"] * 1000), cfg.vocab_size)
    model = build_tiny(tokenizer, cfg.sizes, seed=cfg.seed)
    processor = composition_processor(model, tokenizer)
    media = MediaLoader(processor)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device)
    collate = Collator(processor, media)
    text_tasks = [load_task(world / p) for p in index["pretrain"]["text"]]
    align_tasks = [load_task(world / p) for p in index["pretrain"]["align"]]
    left_out = leave_out_tests(world, align_tasks, _DATA, log)
    seen_by_tests = {o["train"] for o in left_out}

    def align_records(t: Task):
        return [r for r in clean_records(t, "train", _DATA) if r.source not in seen_by_tests]

    if cfg.vision_steps and "image" in model.encoders:
        captioned = [r for t in align_tasks for r in align_records(t) if "image" in r.media]
        words = sorted({w for r in captioned for w in r.answer.lower().split()})
        if cfg.vision_source == "generate" and index.get("format") == FORMAT:
            draw = GeneratedImages(world, index, model.modalities["image"], cfg.seed)
            log(f"pretrain 0/2: vision tower on the words of {cfg.vision_steps * 32} new alignment images")
        else:
            draw = draw_from_files(captioned, media, cfg.seed)
            log(f"pretrain 0/2: vision tower on the words of {len(captioned)} image captions")
        pretrain_vision(model, draw, words, cfg.vision_steps, lr=cfg.vision_lr, progress=progress)
        if isinstance(draw, GeneratedImages):
            log(f"pretrain 0/2: {draw.skipped} draws equal to a test image of the world were skipped")

    # stage 1: language skills, whole language model trained
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.language_model.parameters():
        p.requires_grad_(True)
    text = [e for t in text_tasks for e in encode_records(clean_records(t, "train", _DATA), processor, t.name)]
    log(f"pretrain 1/2: language skills on {len(text)} records ({', '.join(t.name for t in text_tasks)})")
    r1 = fit(model, text, collate, cfg.language, accelerator, seed=cfg.seed, label="language", progress=progress)

    # stage 2: alignment, language skills mixed in (see the module docstring); an image tower that stage 0 trained
    # stays frozen, as CLIP does in LLaVA's stage 1 (trained on here at the LM's pace, it loses the shapes it knew)
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.vision_steps and "image" in model.encoders:
        for p in model.encoders["image"].parameters():
            p.requires_grad_(False)
    align = [e for t in align_tasks for e in encode_records(align_records(t), processor, t.name)] + text
    log(f"pretrain 2/2: vision-language alignment on {len(align) - len(text)} captions (+ language skills)")
    r2 = fit(model, align, collate, cfg.align, accelerator, seed=cfg.seed + 1, label="align", progress=progress)

    scores = {}
    left = Collator(processor, media, left_pad=True)
    for t in text_tasks + align_tasks:
        res = evaluate_task(model, processor, left, t, clean_records(t, "test", _DATA), batch_size=cfg.eval_batch_size,
                            device=accelerator.device)
        scores[t.name] = round(res.score, 2)
    info = {
        "world": str(world.resolve()),
        "world_seed": index.get("seed"),
        "world_version": index.get("version"),
        "world_data_version": index.get("data_version", index.get("version")),
        "base_recipe": BASE_RECIPE,
        "config": asdict(cfg),
        "scores": scores,
        "left_out": left_out,
        "steps": {"language": r1.steps, "align": r2.steps},
        "final_loss": {"language": r1.losses[-1], "align": r2.losses[-1]},
        "time_s": round(time.perf_counter() - t0, 1),
    }
    save_base(model, tokenizer, out, info)
    log("base model scores: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()) + f" ({info['time_s']} s)")
    return out
