"""Clotho-AQA audio question answering; the three annotators' answers to a question are grouped."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from ._common import SHORT_ANSWER, Converted, Item, Source, majority, read_csv

LAYOUT = """\
SRC/
├── clotho_aqa_train.csv   # file_name,QuestionText,answer,confidence (three rows per question)
├── clotho_aqa_val.csv
├── clotho_aqa_test.csv
└── audio_files/
    ├── <file_name>.wav
    └── ...
"""
COLUMNS = ("file_name", "QuestionText", "answer")


def read(source: Source, src: Path, requested: list[str] | None) -> Converted:
    files = {s: [src / f"clotho_aqa_{s}.csv"] for s in source.splits}
    chosen, notes = source.pick_splits(requested, files)
    audio = source.require(src / "audio_files", "folder")
    out: dict[str, list[Item]] = {}
    for split in chosen:
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in read_csv(source, files[split][0], COLUMNS):
            groups.setdefault((row["file_name"], row["QuestionText"]), []).append(row)
        items = []
        for (file_name, question), group in groups.items():
            answers = [r["answer"] for r in group if r["answer"]]
            if not answers:
                continue
            # The majority answer; a tie goes to an answer some annotator was confident about, then to the first.
            sure = [r["answer"] for r in group if r["answer"] and r.get("confidence", "").lower() == "yes"]
            counts = Counter(answers)
            top = [a for a in answers if counts[a] == max(counts.values())]
            gold = majority([a for a in top if a in sure] or top)
            key = f"{Path(file_name).stem}-{hashlib.sha1(question.encode()).hexdigest()[:8]}"
            items.append(Item(key, file_name, f"{question}\n{SHORT_ANSWER}", gold, answers))
        out[split] = items
    return Converted(audio, out, notes)


SOURCE = Source(
    name="clotho_aqa", modality="audio", type="qa", scorer="exact_match", splits=("train", "val", "test"),
    layout=LAYOUT, read=read,
    description="Clotho-AQA audio question answering; references are the three annotators' answers.",
)
