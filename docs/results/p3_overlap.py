"""Does the instruction-tuned base of RESULTS' P3 section train on anything the stream scores? Compares every
train record of the instruction tasks (image_cap, image_qa) with every test record of the image stream (same image
bytes; same image bytes and prompt) on the built-in world; writes docs/results/p3_overlap.json. The records it
finds with the same image and prompt are what `mmcl pretrain --instruct` leaves out (`left_out` in the base's
pretrain.json); a shared image under another prompt is not a shared record, and is only reported here.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/results/p3_overlap.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
INSTRUCT = ("image_cap", "image_qa")


def records(task_dir: Path, split: str):
    for line in open(task_dir / f"{split}.jsonl"):
        r = json.loads(line)
        image = (task_dir / r["image"]).read_bytes() if "image" in r else b""
        yield r["id"], hashlib.sha256(image).hexdigest(), r["conversations"][0]["value"]


def main() -> int:
    from mmcl.builtin import builtin_world

    world = builtin_world(progress=False)
    stream = yaml.safe_load((world / "streams" / "image.yaml").read_text())["tasks"]
    trained = {}
    for t in INSTRUCT:
        for rid, image, prompt in records(world / "tasks" / t, "train"):
            trained.setdefault(image, []).append((rid, prompt))
    doc: dict = {"instruct_tasks": list(INSTRUCT), "stream_tests": {}}
    for rel in stream:
        task_dir = (world / "streams" / rel).resolve()
        same_image, same_record, n = [], [], 0
        for rid, image, prompt in records(task_dir, "test"):
            n += 1
            for tid, tprompt in trained.get(image, []):
                same_image.append([rid, tid])
                if tprompt == prompt:
                    same_record.append([rid, tid])
        doc["stream_tests"][task_dir.name] = {"n_test": n, "same_image": same_image,
                                              "same_image_and_prompt": same_record}
        print(f"{task_dir.name}: {len(same_image)} test images and {len(same_record)} test records of {n} are "
              "instruction-tuning training data")
    (ROOT / "docs/results/p3_overlap.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
