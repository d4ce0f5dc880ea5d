"""Why the built-in multiple-choice task stays at chance: probes of the tiny base model; writes docs/results/mcq_probe.json.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python docs/results/mcq_probe.py [--seeds 0,1]

Measurements on the built-in base (under $MMCL_HOME, made on first use as `mmcl demo` does):
1. The world's `mcq` task fine-tuned alone from the base (the image stream's recipe, as `ceilings.py` does) with its
   answer written five ways: the option's letter (as the world ships it), the letter with four times the steps, the
   option's text, options listed as "circle (B)" answered the same way (so the letter follows a copy of the
   option's word, the pattern induction heads complete), and options listed as usual answered "circle (B)" (the
   shape named first, then its letter). All are scored by `option_letter`, which accepts a letter
   or exactly one option's text.
2. The base's language model trained alone on a text-only lookup ("Which option is the word moon?" over four
   lettered words, answer the letter) for `--lookup-epochs` epochs: whether it can learn to point at an option at
   all, with no image involved. Its 200 test prompts are disjoint from its training prompts.
3. Transfer: the world's `mcq` task fine-tuned alone, as in 1, from the model of 2 (`--transfer-formats`): whether
   a lookup skill learned from text before the stream makes the image task learnable in the stream's steps.
4. Image lookup: the base's projectors and language model trained alone on a colour multiple choice ("Which colour
   is shown?" over four lettered colours, one shape of that colour; the same records and steps as 2, test images
   disjoint), scored on its own test set, then the world's `mcq` (letters) fine-tuned alone from that model.
5. Image prefix: the text lookup of 2 with an unrelated image (one shape) before each question, projectors and
   language model trained as in 4: whether an image in the context alone stops the lookup being learned.
   `image_prefix_scaled`: the same from a copy of the base whose image tokens are scaled to norm 1 (the base's are
   about 20 times a text token embedding's norm), to see whether their size is what gets in the way;
   `text_prefix`: the text lookup of 2 after 64 random digits instead (as many tokens as an image), to see whether
   the distance alone does.

`--parts` chooses which to run (default all; 3 needs 2); the results are merged into the JSON file.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import ceiling  # noqa: E402

LETTERS = "ABCD"
LETTER_TAIL = "the option's letter from the given choices directly"
TEXT_TAIL = "the option's text from the given choices directly"
"""World data 4 asks for the option's text (data 3, where this probe was run, for its letter); every variant starts
from the letter form."""
OPTION = re.compile(r"^([A-D])\. (\w+)$", re.M)


def _letter(prompt: str, gold: str, options: dict) -> tuple[str, str]:
    return prompt, gold


def _text(prompt: str, gold: str, options: dict) -> tuple[str, str]:
    return prompt.replace(LETTER_TAIL, "the option's text"), options[gold]


def _word_then_letter(prompt: str, gold: str, options: dict) -> tuple[str, str]:
    listed = OPTION.sub(r"\2 (\1)", prompt).replace(LETTER_TAIL, "the option as listed")
    return listed, f"{options[gold]} ({gold})"


def _name_then_letter(prompt: str, gold: str, options: dict) -> tuple[str, str]:
    return prompt.replace(LETTER_TAIL, "the shape, then the option's letter in brackets"), f"{options[gold]} ({gold})"


VARIANTS = {"letter": (_letter, []), "letter_4x_steps": (_letter, ["train.epochs=12"]), "option_text": (_text, []),
            "word_then_letter": (_word_then_letter, []), "name_then_letter": (_name_then_letter, [])}


def write_variant(src: Path, dst: Path, rewrite) -> Path:
    """A copy of the task at `src` with each record's prompt and answer rewritten; the reference stays the gold
    letter, so every variant is scored the same way. Images are hard links (or copies) inside `dst`."""
    shutil.copytree(src / "images", dst / "images", copy_function=_link_or_copy)
    manifest = (src / "task.yaml").read_text().replace("max_new_tokens: 3", "max_new_tokens: 6")
    (dst / "task.yaml").write_text(manifest)
    for split in ("train", "test"):
        with open(src / f"{split}.jsonl") as fin, open(dst / f"{split}.jsonl", "w") as fout:
            for line in fin:
                r = json.loads(line)
                prompt, gold = r["conversations"][0]["value"].replace(TEXT_TAIL, LETTER_TAIL), r["answers"][0]
                prompt, answer = rewrite(prompt, gold, dict(OPTION.findall(prompt)))
                r["conversations"][0]["value"], r["conversations"][1]["value"] = prompt, answer
                fout.write(json.dumps(r) + "\n")
    return dst


def _link_or_copy(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def lookup_task(out: Path, n_train: int, seed: int = 0, filler: int = 0) -> Path:
    """A text-only task: which of four lettered words is the one the question names; test prompts never in train.
    `filler` random digits (one token each with the space before them) go first, as long as an image's tokens."""
    from mmcl.data.synth.text_tasks import ORDER_WORDS

    def prompt(rng: random.Random) -> tuple[str, str]:
        gold = rng.choice(ORDER_WORDS)
        options = rng.sample([w for w in ORDER_WORDS if w != gold], 3)
        pos = rng.randrange(4)
        options.insert(pos, gold)
        lines = "\n".join(f"{LETTERS[i]}. {w}" for i, w in enumerate(options))
        digits = " ".join(str(rng.randrange(10)) for _ in range(filler))
        return f"{digits + chr(10) if filler else ''}Which option is the word {gold}?\n{lines}\nAnswer with " \
            f"{LETTER_TAIL}.", LETTERS[pos]

    rng = random.Random(f"mcq-probe/lookup/{seed}")
    train = [prompt(rng) for _ in range(n_train)]
    seen, test = {p for p, _ in train}, []
    while len(test) < 200:
        p, a = prompt(rng)
        if p not in seen:
            seen.add(p)
            test.append((p, a))
    out.mkdir(parents=True)
    for split, rows in (("train", train), ("test", test)):
        with open(out / f"{split}.jsonl", "w") as f:
            for i, (p, a) in enumerate(rows):
                f.write(json.dumps({"id": f"lookup-{split}-{i}", "conversations": [
                    {"from": "human", "value": p}, {"from": "gpt", "value": a}], "answers": [a]}) + "\n")
    (out / "task.yaml").write_text(
        "name: lang_lookup\nmodality: text\ntype: mcq\nscorer: option_letter\n"
        "description: Which of four lettered words is the named one.\ndata_root: .\n"
        "splits: {train: train.jsonl, test: test.jsonl}\nmax_new_tokens: 3\n")
    return out


def _lettered_image_task(out: Path, n_train: int, name: str, description: str, words, question, paint,
                         seed: int = 0) -> Path:
    """An image task over four lettered `words` (gold balanced over A-D), one shape per image coloured
    `paint(rng, gold)`, asked `question(gold)`; written as the world writes its tasks (so no test record repeats a
    train record)."""
    from tqdm import tqdm

    from mmcl.data.synth.image_tasks import _single_shape
    from mmcl.data.synth.shapes import SHAPES
    from mmcl.data.synth.spec import Sample, TaskSpec, balanced
    from mmcl.data.synth.world import _write_task

    def generate(rng: random.Random, n: int, size: int):
        for pos in balanced(rng, range(4), n):
            gold = rng.choice(words)
            options = rng.sample([w for w in words if w != gold], 3)
            options.insert(pos, gold)
            lines = "\n".join(f"{LETTERS[i]}. {w}" for i, w in enumerate(options))
            img = _single_shape(rng, size, rng.choice(SHAPES), paint(rng, gold))
            yield Sample(f"{question(gold)}\n{lines}\nAnswer with {LETTER_TAIL}.", LETTERS[pos], [LETTERS[pos]], img)

    spec = TaskSpec(name, "image", "mcq", "option_letter", description, generate)
    return out / _write_task(out, spec, spec, n_train, 200, seed, 64, tqdm(disable=True))


def colour_task(out: Path, n_train: int, seed: int = 0) -> Path:
    """Which of four lettered colours is the shape's."""
    from mmcl.data.synth.image_tasks import COLOUR_NAMES

    return _lettered_image_task(out, n_train, "colour_mcq", "Which of four lettered colours is shown.", COLOUR_NAMES,
                                lambda gold: "Which colour is shown?", lambda rng, gold: gold, seed)


def prefix_task(out: Path, n_train: int, seed: int = 0) -> Path:
    """The text lookup of `lookup_task` with an unrelated image before the question (one shape, any colour): does
    the image's presence alone stop the model from learning to point at an option?"""
    from mmcl.data.synth.image_tasks import COLOUR_NAMES
    from mmcl.data.synth.text_tasks import ORDER_WORDS

    return _lettered_image_task(out, n_train, "prefix_lookup", "The text lookup after an unrelated image.",
                                ORDER_WORDS, lambda gold: f"Which option is the word {gold}?",
                                lambda rng, gold: rng.choice(COLOUR_NAMES), seed)


def scaled_base(base: Path, out: Path, norm: float = 1.0) -> tuple[Path, float]:
    """A copy of `base` whose image projector's last layer is scaled so that its image tokens have mean norm `norm`
    on the world's mcq images (the base's are about 20 times a text token embedding's). Returns the copy and the
    factor."""
    import torch
    from safetensors.torch import load_file, save_file

    from mmcl.builtin import builtin_world
    from mmcl.data.batching import MediaLoader
    from mmcl.models.builder import load_model
    from mmcl.models.composition import composition_processor

    model, tokenizer = load_model(base)
    media = MediaLoader(composition_processor(model, tokenizer))
    images = sorted((builtin_world(progress=False) / "tasks" / "mcq" / "images").glob("*.png"))[:64]
    with torch.no_grad():
        tokens = model.encode("image", torch.stack([media("image", p).inputs["values"] for p in images]))
    factor = norm / float(tokens.norm(dim=-1).mean())
    shutil.copytree(base, out)
    weights = load_file(str(out / "projectors.safetensors"))
    last = max(k.split(".")[1] for k in weights if k.startswith("image.") and k.count(".") == 2)
    for k in (f"image.{last}.weight", f"image.{last}.bias"):
        weights[k] = weights[k] * factor
    save_file(weights, str(out / "projectors.safetensors"))
    return out, factor


def _tuned(base: Path, task, out: Path, args, parts: list[str]) -> dict:
    """Train `parts` of the base on `task` alone (the lookup recipe) and score its test split before and after."""
    from mmcl.base_tuning import tune_base
    from mmcl.config import TrainConfig

    cfg = TrainConfig(epochs=args.lookup_epochs, batch_size=32, lr=args.lookup_lr, warmup_ratio=0.05)
    info = tune_base(base, [task], [task], out, cfg, parts=parts, info={}, what="mcq probe", label=task.name,
                     score_before=True, eval_batch_size=128, progress=False, log=lambda *a: None)
    return {"records": args.lookup_records, "epochs": args.lookup_epochs, "lr": args.lookup_lr, "parts": parts,
            "steps": info["steps"], "before": info["scores_before"][task.name], "after": info["scores"][task.name],
            "n_test": 200}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated run seeds of the format variants (default 0,1)")
    ap.add_argument("--lookup-records", type=int, default=3000)
    ap.add_argument("--lookup-epochs", type=int, default=10)
    ap.add_argument("--lookup-lr", type=float, default=1e-3)
    ap.add_argument("--parts", default="formats,lookup,transfer,image_lookup,image_prefix,image_prefix_scaled,text_prefix",
                    help="which measurements (default all)")
    ap.add_argument("--formats", default=",".join(VARIANTS), help="answer formats of part 1 (default all)")
    ap.add_argument("--transfer-formats", default="letter,name_then_letter", help="answer formats of part 3")
    ap.add_argument("--out", default=str(ROOT / "docs/results/mcq_probe.json"))
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if "transfer" in parts and "lookup" not in parts:
        ap.error("--parts transfer needs lookup (the transfer starts from the lookup-trained model)")
    from mmcl.builtin import builtin_model, builtin_world
    from mmcl.data.records import load_task

    world, base = builtin_world(progress=False), builtin_model(progress=False)
    seeds = [int(s) for s in args.seeds.split(",")]
    info = json.loads((base / "pretrain.json").read_text())  # which base instance (pre-training is not bit-exact)
    out = Path(args.out)
    doc: dict = json.loads(out.read_text()) if out.exists() else {}
    if doc.get("base_scores", info.get("scores")) != info.get("scores"):
        print(f"error: {out} was measured on another base instance; choose another --out", file=sys.stderr)
        return 2
    doc.update({"base": info.get("base_recipe"), "base_scores": info.get("scores")})
    with tempfile.TemporaryDirectory() as tmp:
        tasks = {name: write_variant(world / "tasks" / "mcq", Path(tmp) / name / "mcq", rewrite)
                 for name, (rewrite, _) in VARIANTS.items()}
        for name in args.formats.split(",") if "formats" in parts else ():
            overrides = VARIANTS[name][1]
            scores = [ceiling("mcq", "image", tasks[name], s, Path(tmp) / name, overrides)["score"] for s in seeds]
            doc.setdefault("formats", {})[name] = {"overrides": overrides, "seeds": seeds, "scores": scores}
            print(f"mcq as {name:18s} {scores}", flush=True)
        if "lookup" in parts:
            task = load_task(lookup_task(Path(tmp) / "lookup", args.lookup_records))
            doc["text_lookup"] = _tuned(base, task, Path(tmp) / "lookup-model", args, ["language_model"])
            print(f"text lookup: {doc['text_lookup']}", flush=True)
        for name in args.transfer_formats.split(",") if "transfer" in parts else ():
            over = [f"model.path={Path(tmp) / 'lookup-model'}", *VARIANTS[name][1]]
            work = Path(tmp) / "transfer" / name
            work.mkdir(parents=True)
            scores = [ceiling("mcq", "image", tasks[name], s, work, over)["score"] for s in seeds]
            doc.setdefault("transfer", {})[name] = {"from": "text_lookup model", "seeds": seeds, "scores": scores}
            print(f"mcq as {name} from the lookup-trained model: {scores}", flush=True)
        if "image_lookup" in parts:
            task = load_task(colour_task(Path(tmp) / "colour", args.lookup_records))
            model = Path(tmp) / "colour-model"
            doc["image_lookup"] = _tuned(base, task, model, args, ["projectors", "language_model"])
            work = Path(tmp) / "transfer" / "from-colour"
            work.mkdir(parents=True)
            scores = [ceiling("mcq", "image", tasks["letter"], s, work, [f"model.path={model}"])["score"]
                      for s in seeds]
            doc["image_lookup"]["mcq_letter_after"] = {"seeds": seeds, "scores": scores}
            print(f"image lookup: {doc['image_lookup']}", flush=True)
        if "image_prefix" in parts:
            task = load_task(prefix_task(Path(tmp) / "prefix", args.lookup_records))
            doc["image_prefix_lookup"] = _tuned(base, task, Path(tmp) / "prefix-model", args,
                                                ["projectors", "language_model"])
            print(f"text lookup after an unrelated image: {doc['image_prefix_lookup']}", flush=True)
        if "text_prefix" in parts:
            task = load_task(lookup_task(Path(tmp) / "filler", args.lookup_records, filler=64))
            doc["text_prefix_lookup"] = {"filler_digits": 64, **_tuned(base, task, Path(tmp) / "filler-model", args,
                                                                       ["language_model"])}
            print(f"text lookup after 64 random digits: {doc['text_prefix_lookup']}", flush=True)
        if "image_prefix_scaled" in parts:
            task = load_task(prefix_task(Path(tmp) / "prefix-s", args.lookup_records))
            scaled, factor = scaled_base(base, Path(tmp) / "scaled-base")
            doc["image_prefix_lookup_scaled"] = {"projector_scale": round(factor, 4), **_tuned(
                scaled, task, Path(tmp) / "prefix-s-model", args, ["projectors", "language_model"])}
            print(f"the same from image tokens of norm 1: {doc['image_prefix_lookup_scaled']}", flush=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
