"""`mmcl pretrain`: build the tiny base model the built-in stream starts from.

Three stages. (0) The tiny vision tower has no pretrained weights to borrow (a real LLaVA starts from CLIP), so it
first learns to predict the words of each alignment caption from its pooled features (a multi-label bag of words,
as in Joulin et al. 2016, "Learning Visual Features from Large Weakly Supervised Data"); the linear head is then
discarded. Then, as in the LLaVA recipe seen as continual learning (P1): (1) the language model learns the world's
language skills (text only); (2) vision-language alignment on image captions (LLaVA stage 1). Unlike a real LLM,
the tiny language model has never seen caption language, so stage 2 trains the projector and the language model
together (the image tower stays frozen after stage 0, as CLIP is in LLaVA; the audio tower trains), with
the language-skill records mixed in so the skills are kept. The alignment captions name colours, classes, places,
counts, written words and boxes (docs/world.md), so the stream's tasks ask for what the base has seen described.
The model's scores on the language skills are saved with it, so a user can see it has skills to lose.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import torch
from accelerate import Accelerator

from mmcl.base_tuning import clean_records, save_base, tune_base
from mmcl.config import TrainConfig
from mmcl.data.batching import Collator, MediaLoader, encode_records
from mmcl.data.records import load_task
from mmcl.engine.train import fit
from mmcl.eval.generate import evaluate_task
from mmcl.models.composition import composition_processor
from mmcl.models.tiny import TinySizes, build_tiny
from mmcl.models.tokenizer import ASSISTANT, USER, train_bpe_tokenizer

_DATA = "pre-training data"


@dataclass
class PretrainConfig:
    seed: int = 0
    vocab_size: int = 1024
    sizes: TinySizes = field(default_factory=TinySizes)
    vision_steps: int = 2400
    """Stage 0 steps (batch 32, lr `vision_lr`); 0 skips it (e.g. for a pretrained tower). A tower from scratch tells
    colours apart within a few hundred steps but shapes only after thousands, on thousands of images (on fewer it
    overfits); see docs/world.md."""
    vision_lr: float = 4e-3
    language: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=8, batch_size=32, lr=3e-3, warmup_ratio=0.05))
    align: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, batch_size=32, lr=1e-3, warmup_ratio=0.05))
    eval_batch_size: int = 128


def pretrain_vision(model, records, media, steps: int, *, seed: int, batch_size: int = 32, lr: float = 2e-3,
                    progress: bool = True) -> float:
    """Stage 0: train the image tower to predict which words its caption contains; returns the final loss."""
    from tqdm.auto import tqdm

    encoder, spec = model.encoders["image"], model.modalities["image"]
    words = sorted({w for r in records for w in r.answer.lower().split()})
    index = {w: k for k, w in enumerate(words)}
    targets = torch.zeros(len(records), len(words))
    for i, r in enumerate(records):
        for w in r.answer.lower().split():
            targets[i, index[w]] = 1.0
    head = torch.nn.Linear(encoder.config.hidden_size, len(words))
    params = list(encoder.parameters()) + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    encoder.train()
    loss = torch.zeros(())
    for _ in tqdm(range(steps), desc="vision", leave=False, disable=not progress):
        idx = torch.randint(0, len(records), (batch_size,), generator=g)
        images = torch.stack([media("image", records[i].media["image"]).inputs["values"] for i in idx.tolist()])
        feats = encoder(images).last_hidden_state
        feats = feats[:, 1:] if spec.select == "patch" else feats
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(feats.mean(1)), targets[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def instruction_tune(base: Path, world: Path, out: Path, tasks: list[str], cfg: TrainConfig | None = None, *,
                     seed: int = 0, progress: bool = True, log=print) -> Path:
    """P3's multi-task instruction-tuned base (InstructBLIP vs BLIP-2): `base` trained jointly on the world tasks
    `tasks` (which must not be the stream's), with the language skills mixed in as in alignment, saved to `out`."""
    cfg = cfg or TrainConfig(epochs=2, batch_size=32, lr=5e-4, warmup_ratio=0.05)
    world = Path(world)
    index = json.loads((world / "world.json").read_text())
    chosen = [load_task(world / "tasks" / t) for t in tasks]
    trained = chosen + [load_task(world / p) for p in index["pretrain"]["text"]]
    info = tune_base(base, trained, trained, out, cfg, parts=["projectors", "language_model"],
                     info={"instruct_tasks": tasks}, what="instruction-tuning data", label="instruct", seed=seed,
                     eval_batch_size=128, progress=progress, log=log)
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

    if cfg.vision_steps and "image" in model.encoders:
        captioned = [r for t in align_tasks for r in clean_records(t, "train", _DATA) if "image" in r.media]
        log(f"pretrain 0/2: vision tower on the words of {len(captioned)} image captions")
        pretrain_vision(model, captioned, media, cfg.vision_steps, seed=cfg.seed, lr=cfg.vision_lr,
                        progress=progress)

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
    align = [e for t in align_tasks for e in encode_records(clean_records(t, "train", _DATA), processor, t.name)] + text
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
        "config": asdict(cfg),
        "scores": scores,
        "steps": {"language": r1.steps, "align": r2.steps},
        "final_loss": {"language": r1.losses[-1], "align": r2.losses[-1]},
        "time_s": round(time.perf_counter() - t0, 1),
    }
    save_base(model, tokenizer, out, info)
    log("base model scores: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()) + f" ({info['time_s']} s)")
    return out
