"""Tiny random LLaVA-1.5, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL checkpoints, saved the way a Hugging Face user
saves a real one: `model.save_pretrained` (safetensors + generation_config.json), the tokenizer, the image processor
(preprocessor_config.json) and a `chat_template.jinja` shaped like the family's real template. No mmcl files, so
loading them exercises exactly the path a downloaded checkpoint takes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tiny_hf.tokenizer import tiny_tokenizer

# llava-hf/llava-1.5-7b-hf's template: images first, "USER: ... ASSISTANT:" and no end-of-turn token after answers.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf's template, verbatim: note "<|im_start|>assistant " in a rendered turn
# but "<|im_start|>assistant\n" as the generation prompt (the two differ in whitespace only).
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2-VL-2B-Instruct's ChatML template (default system prompt, vision markers around each pad token).
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def _save(out_dir: Path, model, tokenizer, image_processor, template: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(template)
    return out_dir


def build_llava(out_dir: Path) -> Path:
    """LLaVA-1.5 shape: CLIP tower (16 px, 4 px patches -> 16 image tokens, CLS dropped) + Llama; like Llama's, the
    tokenizer puts <s> in front of every text itself (the template does not write it)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = tiny_tokenizer(["<image>"], image_token="<image>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                              special_tokens=[("<s>", tok.bos_token_id)])
    v = len(tok)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=4),
        text_config=LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return _save(out_dir, model, tok, ip, LLAVA_TEMPLATE)


def build_llava_onevision(out_dir: Path) -> Path:
    """OneVision shape: SigLIP tower (16 px tiles, 4 px patches -> 16 features per tile), anyres tiling over 16/32 px
    pinpoints, Qwen2 LM; reads images and video."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    tok = tiny_tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                         pad="<|endoftext|>", image_token="<image>", video_token="<video>")
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    ip = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints)
    return _save(out_dir, model, tok, ip, ONEVISION_TEMPLATE)


def _qwen_tokenizer(eos: str):
    return tiny_tokenizer(QWEN_SPECIALS, bos=None, eos=eos, pad="<|endoftext|>", image_token="<|image_pad|>",
                          video_token="<|video_pad|>")


def _qwen_ids(tok) -> dict:
    return dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))


def _qwen_text(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512, bos_token_id=None,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id,
                rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]))


def _qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    # 14 px patches, 2x2 merge: a 32x32 image is lifted to 56x56 (4 tokens), a 40x56 one to 56x84 (6 tokens)
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 84)


def build_qwen2_vl(out_dir: Path) -> Path:
    """Qwen2-VL shape: 14 px patches merged 2x2 (a 32x32 image -> 4 tokens, 40x56 -> 6), images and video."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = _qwen_tokenizer(eos="<|im_end|>")
    cfg = Qwen2VLConfig(vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
                        text_config=_qwen_text(tok), **_qwen_ids(tok))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg)
    return _save(out_dir, model, tok, _qwen_image_processor(), QWEN_TEMPLATE)


def build_qwen2_5_vl(out_dir: Path) -> Path:
    """Qwen2.5-VL shape (window attention in block 0, full attention in block 1); its tokenizer's eos is
    <|endoftext|> like a base checkpoint, so the end of turn (<|im_end|>) must come from the template."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer(eos="<|endoftext|>")
    cfg = Qwen2_5_VLConfig(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                              out_hidden_size=32, window_size=56, fullatt_block_indexes=[1]),
                           text_config=_qwen_text(tok), **_qwen_ids(tok))
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    return _save(out_dir, model, tok, _qwen_image_processor(), QWEN_TEMPLATE)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llava": build_llava,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
}
