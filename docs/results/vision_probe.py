"""The stage-0 probe of docs/world.md: train a CLIP-style tower alone on the bag of words of the world's alignment
captions (as `mmcl pretrain` stage 0 does) and report its held-out shape-word accuracy, overall and per caption kind.

    python docs/results/vision_probe.py IMAGES STEPS [--hidden 64 --layers 2 --patch 8 --lr 4e-3 --constant-lr]

IMAGES is how many distinct alignment images it trains on (drawn once, then reused), or 0 for a new draw at every
step as `mmcl pretrain` now does. The 800 held-out images come from another seed of the same generator.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from mmcl.data.synth.image_tasks import align
from mmcl.data.synth.shapes import SHAPES

SIZE = 64


def draw(seed: int, n: int) -> tuple[torch.Tensor, list[str]]:
    samples = list(align(random.Random(seed), n, SIZE))
    images = [np.asarray(s.image.convert("RGB"), dtype=np.float32) / 127.5 - 1 for s in samples]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), [s.answer for s in samples]


def shape_of(word: str) -> str | None:
    word = "cross" if word == "crosses" else word.removesuffix("s")
    return word if word in SHAPES else None


def kind_of(caption: str) -> str:
    words = caption.split()
    return "box" if "[" in caption else "count" if any(w in words for w in ("one", "two", "three", "four")) \
        else "shape"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("images", type=int)
    ap.add_argument("steps", type=int)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--constant-lr", action="store_true", help="no one-cycle schedule (the recipe before v2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    test_x, test_c = draw(12345, 800)
    words = sorted({w for c in draw(7, 4000)[1] for w in c.split()})
    index = {w: i for i, w in enumerate(words)}
    fixed = draw(1, args.images) if args.images else None
    torch.manual_seed(0)
    enc = CLIPVisionModel(CLIPVisionConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                           num_hidden_layers=args.layers, num_attention_heads=4, image_size=SIZE,
                                           patch_size=args.patch))
    head = torch.nn.Linear(args.hidden, len(words))
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=args.lr)
    sched = None if args.constant_lr else torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                                              pct_start=0.05)
    g, rng = torch.Generator().manual_seed(0), random.Random(99)
    for _ in range(args.steps):
        if fixed:
            idx = torch.randint(0, args.images, (32,), generator=g)
            x, captions = fixed[0][idx], [fixed[1][i] for i in idx.tolist()]
        else:
            x, captions = draw(rng.randrange(10**9), 32)
        y = torch.zeros(len(captions), len(words))
        for i, c in enumerate(captions):
            for w in c.split():
                if w in index:
                    y[i, index[w]] = 1
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(enc(x).last_hidden_state[:, 1:].mean(1)), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
    enc.eval()
    with torch.no_grad():
        logits = head(enc(test_x).last_hidden_state[:, 1:].mean(1))
    right, seen = Counter(), Counter()
    for i, c in enumerate(test_c):
        gold = [s for s in map(shape_of, c.split()) if s]
        if gold:
            pred = max((s for s in SHAPES if s in index), key=lambda s: logits[i, index[s]])
            right[kind_of(c)] += pred == gold[0]
            seen[kind_of(c)] += 1
    per_kind = {k: round(100 * right[k] / seen[k], 1) for k in seen}
    print(f"{vars(args)}: final loss {loss.item():.3f}, held-out shape accuracy "
          f"{100 * sum(right.values()) / sum(seen.values()):.1f} (n={sum(seen.values())}), per caption kind {per_kind}"
          f" ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
