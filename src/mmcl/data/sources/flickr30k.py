"""Flickr30k image captioning from the Karpathy split file (`dataset_flickr30k.json`)."""

from __future__ import annotations

from pathlib import Path

from ._common import Converted, Item, Source, choose_splits, read_json

LAYOUT = """\
SRC/
├── dataset_flickr30k.json      # Karpathy split: {"images": [{"filename", "split", "sentences": [{"raw"}]}]}
└── flickr30k-images/
    ├── 1000092795.jpg
    └── ...
"""
PROMPT = "Describe the image briefly."


def read(source: Source, src: Path, requested: list[str] | None) -> Converted:
    ann = src / "dataset_flickr30k.json"
    data = read_json(source, ann)
    images_dir = source.require(src / "flickr30k-images", "folder")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise source.error(f"{ann} has no 'images' list")
    by_split: dict[str, list[Item]] = {s: [] for s in source.splits}
    for k, img in enumerate(images):
        try:
            filename, split = str(img["filename"]), str(img["split"])
            captions = [str(s["raw"]).strip() for s in img["sentences"]]
        except (KeyError, TypeError) as e:
            raise source.error(f"{ann}: images[{k}] lacks filename, split or sentences[].raw ({e!r})") from e
        captions = [c for c in captions if c]
        if split in by_split and captions:
            by_split[split].append(Item(Path(filename).stem, filename, PROMPT, captions[0], captions))
    chosen, notes = choose_splits(source, by_split, requested, "captioned images", str(ann))
    return Converted(images_dir, {s: by_split[s] for s in chosen}, notes)


SOURCE = Source(
    name="flickr30k", modality="image", type="caption", scorer="cider", splits=("train", "val", "test"),
    layout=LAYOUT, read=read,
    description="Flickr30k image captioning (Karpathy splits); references are the five captions of each image.",
)
