"""A tiny byte-level BPE tokenizer for test checkpoints: trained in a fraction of a second on a fixed text that
covers the built-in world's words, with the family's special tokens."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

_TEXT = (
    "what colour is the shape red green blue yellow purple orange white black circle square triangle star "
    "how many shapes are there one two three four five six seven eight nine ten zero which word is written "
    "answer with the letter of the option a b c d where is the box describe the image a picture of "
    "the user assistant system you are a helpful question answer describe this audio video a beep sound "
    "moving left right up down 0 1 2 3 4 5 6 7 8 9 + - = , . ? ! : ; ( ) [ ] { } < > / \n"
)


def tiny_tokenizer(special: list[str], *, vocab_size: int = 400, bos: str | None = "<s>", eos: str = "</s>",
                   pad: str = "<pad>", chat_template: str | None = None, **named: str) -> PreTrainedTokenizerFast:
    """BPE with `<pad>`, `bos`, `eos`, `<unk>` and `special` as added special tokens; `named` maps attribute names to
    tokens that the processor expects on the tokenizer (e.g. image_token="<image>")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = [t for t in (pad, bos, eos, "<unk>") if t]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=base + list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT] * 4, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                  additional_special_tokens=list(special), extra_special_tokens=named or None)
    if chat_template:
        out.chat_template = chat_template
    return out
