"""OK-VQA image question answering from the official question and annotation files (COCO 2014 images)."""

from __future__ import annotations

from pathlib import Path

from ._common import SHORT_ANSWER, Converted, Item, Source, majority, read_json

LAYOUT = """\
SRC/
├── OpenEnded_mscoco_train2014_questions.json   # {"questions": [{"image_id", "question", "question_id"}]}
├── mscoco_train2014_annotations.json           # {"annotations": [{"question_id", "answers": [{"answer"}]}]}
├── OpenEnded_mscoco_val2014_questions.json
├── mscoco_val2014_annotations.json
├── train2014/COCO_train2014_000000051606.jpg   # COCO_{split}2014_{image_id:012d}.jpg
└── val2014/COCO_val2014_000000000073.jpg
mmcl splits: train <- train2014, test <- val2014 (the official OK-VQA evaluation split)
"""
COCO = {"train": "train2014", "test": "val2014"}


def _files(src: Path, coco: str) -> list[Path]:
    return [src / f"OpenEnded_mscoco_{coco}_questions.json", src / f"mscoco_{coco}_annotations.json"]


def read(source: Source, src: Path, requested: list[str] | None) -> Converted:
    chosen, notes = source.pick_splits(requested, {s: _files(src, COCO[s]) for s in source.splits})
    out: dict[str, list[Item]] = {}
    for split in chosen:
        coco = COCO[split]
        source.require(src / coco, "folder")
        qfile, afile = _files(src, coco)
        qdata, adata = read_json(source, qfile), read_json(source, afile)
        try:
            answers = {a["question_id"]: [str(x["answer"]).strip() for x in a["answers"]]
                       for a in adata["annotations"]}
            questions = [(q["question_id"], q["image_id"], str(q["question"]).strip()) for q in qdata["questions"]]
        except (KeyError, TypeError) as e:
            raise source.error(f"{qfile} / {afile}: unexpected structure ({e!r})") from e
        items = []
        for qid, image_id, question in questions:
            refs = [a for a in answers.get(qid, []) if a]
            if not refs:
                raise source.error(f"{afile}: no answers for question_id {qid} (from {qfile})")
            media = f"{coco}/COCO_{coco}_{int(image_id):012d}.jpg"
            items.append(Item(str(qid), media, f"{question}\n{SHORT_ANSWER}", majority(refs), refs))
        out[split] = items
    return Converted(src, out, notes)


SOURCE = Source(
    name="okvqa", modality="image", type="qa", scorer="vqa_accuracy", splits=("train", "test"),
    layout=LAYOUT, read=read,
    description="OK-VQA (outside-knowledge VQA on COCO 2014); references are the ten annotator answers.",
)
