"""MSR-VTT video captioning from `MSRVTT_data.json` or the challenge files `{train_val,test}_videodatainfo.json`."""

from __future__ import annotations

from pathlib import Path

from ._common import Converted, Item, Source, choose_splits, read_json

LAYOUT = """\
SRC/
├── MSRVTT_data.json                # {"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]}
└── videos/all/video0.mp4 ...
or the challenge release:
SRC/
├── train_val_videodatainfo.json    # same structure; splits train, validate
├── test_videodatainfo.json         # optional; split test
├── TrainValVideo/video0.mp4 ...
└── TestVideo/video7010.mp4 ...
mmcl splits: train <- train, val <- validate, test <- test
"""
PROMPT = "Describe the video briefly."
SPLIT = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def read(source: Source, src: Path, requested: list[str] | None) -> Converted:
    if (src / "MSRVTT_data.json").is_file():
        infos = [src / "MSRVTT_data.json"]
    elif (src / "train_val_videodatainfo.json").is_file():
        infos = [src / "train_val_videodatainfo.json"]
        infos += [src / "test_videodatainfo.json"] if (src / "test_videodatainfo.json").is_file() else []
    else:
        raise source.error(f"{src / 'MSRVTT_data.json'} not found (nor {src / 'train_val_videodatainfo.json'})")
    if (src / "videos" / "all").is_dir():
        root, folders = src / "videos" / "all", [""]
    elif (src / "TrainValVideo").is_dir() or (src / "TestVideo").is_dir():
        root, folders = src, [f for f in ("TrainValVideo/", "TestVideo/") if (src / f).is_dir()]
    else:
        raise source.error(f"{src / 'videos' / 'all'} not found (nor {src / 'TrainValVideo'})")
    split_of: dict[str, str] = {}
    captions: dict[str, list[str]] = {}
    for info in infos:
        data = read_json(source, info)
        try:
            for v in data["videos"]:
                split_of[str(v["video_id"])] = SPLIT.get(str(v["split"]), str(v["split"]))
            for s in data["sentences"]:
                if str(s["caption"]).strip():
                    captions.setdefault(str(s["video_id"]), []).append(str(s["caption"]).strip())
        except (KeyError, TypeError) as e:
            raise source.error(f"{info}: expected videos[].video_id/split and sentences[].video_id/caption ({e!r})")
    by_split: dict[str, list[Item]] = {s: [] for s in source.splits}
    for vid, split in split_of.items():
        if split not in by_split or not captions.get(vid):
            continue
        default = "TestVideo/" if split == "test" and "TestVideo/" in folders else folders[0]
        folder = next((f for f in folders if (root / f"{f}{vid}.mp4").is_file()), default)
        refs = captions[vid]
        by_split[split].append(Item(vid, f"{folder}{vid}.mp4", PROMPT, refs[0], refs))
    chosen, notes = choose_splits(source, by_split, requested, "captioned videos", ", ".join(map(str, infos)))
    return Converted(root, {s: by_split[s] for s in chosen}, notes)


SOURCE = Source(
    name="msrvtt", modality="video", type="caption", scorer="cider", splits=("train", "val", "test"),
    layout=LAYOUT, read=read,
    description="MSR-VTT video captioning; references are the twenty captions of each video.",
)
