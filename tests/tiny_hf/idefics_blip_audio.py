"""Tiny random Idefics3, SmolVLM, BLIP-2, InstructBLIP and Qwen2-Audio checkpoints, saved the way a Hugging Face user
saves them: `model.save_pretrained` (config + safetensors), the tokenizer, the image processor or feature extractor,
the Q-Former tokenizer in `qformer_tokenizer/` (InstructBLIP) and a `chat_template.jinja` shaped like the real
family's where the real family has one (BLIP-2 and InstructBLIP have none, so mmcl's plain fallback is used).

Each model has well under 1 M parameters (hidden 32-64, 1-2 layers, 32 px images, 1 s audio) so that the backend
tests run in seconds on a CPU. `BUILDERS[model_type](out_dir)` writes one checkpoint and returns its directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tiny_hf.tokenizer import tiny_tokenizer

IMAGE_SIZE, PATCH = 32, 8

# Shaped like HuggingFaceM4/Idefics3-8B-Llama3's template ("User:<image>text<end_of_utterance>\nAssistant: ...").
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# SmolVLM's is the same with <|im_start|> in front.
SMOLVLM_TEMPLATE = "<|im_start|>" + IDEFICS3_TEMPLATE[len("<|begin_of_text|>"):]

# Qwen2-Audio-7B-Instruct's ChatML template (audio items need an "audio" or "audio_url" key).
QWEN2_AUDIO_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _save(out: Path, model: torch.nn.Module, tokenizer, template: str | None, *processors) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for p in processors:
        p.save_pretrained(out)
    if template:
        (out / "chat_template.jinja").write_text(template)
    return out


def _vision(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=PATCH, **extra)


def _llama(vocab: int, **extra) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)


def _idefics_like(out: Path, *, smol: bool) -> Path:
    """Idefics3 / SmolVLM: 32 px tiles of 8 px patches, pixel-shuffle 2 -> 4 `<image>` tokens per tile."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
    )

    rows = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    start = "<|im_start|>" if smol else "<|begin_of_text|>"
    tok = tiny_tokenizer([start, "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows],
                         bos=None, eos="<end_of_utterance>",
                         chat_template=SMOLVLM_TEMPLATE if smol else IDEFICS3_TEMPLATE, image_token="<image>",
                         fake_image_token="<fake_token_around_image>", global_image_token="<global-img>",
                         end_of_utterance_token="<end_of_utterance>")
    text = _llama(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cls, cfg_cls, ip_cls = ((SmolVLMForConditionalGeneration, SmolVLMConfig, SmolVLMImageProcessorPil) if smol else
                            (Idefics3ForConditionalGeneration, Idefics3Config, Idefics3ImageProcessorPil))
    cfg = cfg_cls(vision_config=_vision(), text_config=text, scale_factor=2,
                  image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    model = cls(cfg)
    # Idefics3 splits images into 32 px tiles plus a global view (its default); the SmolVLM checkpoint keeps one
    # 32 px view, so both paths of the expansion are exercised.
    ip = ip_cls(size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
                do_image_splitting=not smol)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return _save(out, model, tok, tok.chat_template, ip)


def build_idefics3(out: Path) -> Path:
    return _idefics_like(out, smol=False)


def build_smolvlm(out: Path) -> Path:
    return _idefics_like(out, smol=True)


def _qformer_tokenizer():
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP]) standing in for InstructBLIP's bert-base-uncased."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny_hf.tokenizer import _TEXT

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator([_TEXT] * 4, trainers.WordPieceTrainer(
        vocab_size=160, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


def _blip(out: Path, *, instruct: bool) -> Path:
    """BLIP-2 (OPT decoder) / InstructBLIP (Llama decoder): 32 px images, a 1-layer Q-Former, 4 query tokens."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
    )

    tok = tiny_tokenizer(["<image>"])  # like the hub BLIP tokenizers: <image> added, no image_token attribute
    # Larger initial weights than the default 0.02: otherwise the tiny Q-Former's output hardly depends on the image.
    qformer = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   encoder_hidden_size=32, max_position_embeddings=64, initializer_range=0.3)
    if instruct:
        qtok = _qformer_tokenizer()
        text = _llama(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
        cfg = InstructBlipConfig(vision_config=_vision(initializer_range=0.3), text_config=text,
                                 qformer_config=dict(qformer, vocab_size=len(qtok), pad_token_id=qtok.pad_token_id),
                                 num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
        model = InstructBlipForConditionalGeneration(cfg)
    else:
        text = dict(model_type="opt", vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                    num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=512,
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        cfg = Blip2Config(vision_config=_vision(initializer_range=0.3), text_config=text, qformer_config=qformer,
                          num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
        model = Blip2ForConditionalGeneration(cfg)
    with torch.no_grad():  # zeros by default: random queries make the tiny model's image features distinct
        model.query_tokens.normal_(0, 0.5)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    ip = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    _save(out, model, tok, None, ip)
    if instruct:
        qtok.save_pretrained(out / "qformer_tokenizer")
    return out


def build_blip2(out: Path) -> Path:
    return _blip(out, instruct=False)


def build_instructblip(out: Path) -> Path:
    return _blip(out, instruct=True)


def build_qwen2_audio(out: Path) -> Path:
    """Qwen2-Audio: 80 mel bins, 1 s windows (100 frames -> 25 `<|AUDIO|>` tokens), a 2-layer Qwen2 decoder."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

    tok = tiny_tokenizer(["<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"],
                         bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN2_AUDIO_TEMPLATE,
                         audio_token="<|AUDIO|>", audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>")
    cfg = Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=80, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, max_source_positions=50),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    model = Qwen2AudioForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    return _save(out, model, tok, QWEN2_AUDIO_TEMPLATE, fe)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "blip-2": build_blip2,
    "instructblip": build_instructblip,
    "qwen2_audio": build_qwen2_audio,
}
