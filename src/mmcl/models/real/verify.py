"""Numerical checks of each conversion against what the original weights do: DINOv2 against the ONNX graph's own
backbone output (onnxruntime), Whisper by transcribing a known clip, SmolLM2 by a known completion. A conversion
that fails its check is not used."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch


class ConversionCheckError(RuntimeError):
    """A converted checkpoint does not reproduce the original weights' behaviour."""


def dinov2_matches_onnx(onnx_path: Path, hf_dir: Path, *, size: int = 224, atol: float = 1e-3, seed: int = 0) -> float:
    """Run the ONNX graph (to its backbone's final LayerNorm) and the converted `Dinov2Model` on the same random
    image; returns the largest absolute difference, raising when it exceeds `atol`."""
    import onnx
    import onnxruntime
    from transformers import Dinov2Model

    model_proto = onnx.load(str(onnx_path))
    graph = model_proto.graph
    final = [n for n in graph.node if n.name.startswith("/backbone/layernorm/") and n.op_type == "Add"]
    if not final:
        raise ConversionCheckError(f"{onnx_path}: no /backbone/layernorm output to compare against")
    tap = final[-1].output[0]
    graph.output.append(onnx.helper.make_tensor_value_info(tap, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    expected = session.run([tap], {graph.input[0].name: pixels})[0]
    model = Dinov2Model.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    diff = float(np.abs(got - expected).max())
    if got.shape != expected.shape or diff > atol:
        raise ConversionCheckError(f"{hf_dir}: DINOv2 features differ from the ONNX graph's by {diff:.2e} "
                                   f"(shapes {got.shape} vs {expected.shape}; tolerance {atol})")
    return diff


SPEECH = "please call stella and ask her to bring these things with her from the store"


def speak(text: str, path: Path) -> bool:
    """Synthesize `text` as 16 kHz mono speech with espeak-ng (False when espeak-ng is not installed)."""
    if shutil.which("espeak-ng") is None:
        return False
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True, capture_output=True)
    return True


def whisper_transcribes(hf_dir: Path, text: str = SPEECH) -> str:
    """Transcribe espeak-ng speech of `text` with the converted Whisper; at least 70 % of its words must come back
    (espeak-ng's voice is robotic: tiny.en gets most, not always all, words). Without espeak-ng, a shorter check:
    the model's greedy decoding of silence must end at once (its first new token is end-of-text or a blank)."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    from mmcl.data.media import read_audio

    model = WhisperForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = WhisperTokenizerFast.from_pretrained(hf_dir)
    extractor = WhisperFeatureExtractor.from_pretrained(hf_dir)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        spoken = speak(text, wav)
        audio = read_audio(wav, 16000) if spoken else np.zeros(16000, dtype=np.float32)
    feats = extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    start = [tokenizer.convert_tokens_to_ids("<|startoftranscript|>"), tokenizer.convert_tokens_to_ids("<|notimestamps|>")]
    with torch.no_grad():
        ids = model.generate(feats, decoder_input_ids=torch.tensor([start]), max_new_tokens=30)
    heard = tokenizer.decode(ids[0], skip_special_tokens=True).strip()
    if spoken:
        said = text.lower().split()
        words = set("".join(c for c in heard.lower() if c.isalnum() or c.isspace()).split())
        if sum(w in words for w in said) < 0.7 * len(said):
            raise ConversionCheckError(f"{hf_dir}: Whisper heard {heard!r} for espeak-ng's {text!r}")
    elif len(heard.split()) > 3:
        raise ConversionCheckError(f"{hf_dir}: Whisper transcribed silence as {heard!r}")
    return heard


def llm_completes(hf_dir: Path, prompt: str = "The capital of France is", expect: str = "Paris") -> str:
    """Greedy completion of a known fact by the converted language model must contain `expect`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if expect.lower() not in text.lower():
        raise ConversionCheckError(f"{hf_dir}: completed {prompt!r} with {text!r}, expected {expect!r}")
    return text
