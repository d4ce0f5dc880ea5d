"""Tokenizers: a byte-level BPE trained on the built-in world's text, and the conversation format shared by training
and evaluation (so the answer a model is trained to write is exactly what evaluation asks it to generate)."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

PLACEHOLDERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", *PLACEHOLDERS.values()]
USER, ASSISTANT = "USER:", "ASSISTANT:"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (0.2 s for the built-in world) with mmcl's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(PLACEHOLDERS.values()),
    )


def ensure_placeholders(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Add the modality placeholders (and a pad token) to a tokenizer that lacks them; return modality -> id."""
    missing = [p for p in PLACEHOLDERS.values() if p not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return {m: tokenizer.convert_tokens_to_ids(p) for m, p in PLACEHOLDERS.items()}


class ConversationFormat:
    """Turns LLaVA conversations into token ids and labels: `<s>USER: ...\\nASSISTANT: answer</s>\\n...`.

    Pieces are tokenized separately and concatenated, so the prompt of an evaluation sample is a byte-exact prefix
    of its training sequence; placeholders are expanded to one token per feature position. Labels are -100 except
    on assistant answers and their end-of-sequence token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, num_tokens: dict[str, int], cues: dict[str, str]):
        self.tok = tokenizer
        self.num_tokens = num_tokens
        self.ids = {m: tokenizer.convert_tokens_to_ids(p) for m, p in PLACEHOLDERS.items() if m in num_tokens}
        self._cache: dict[str, list[int]] = {}
        self.cue_ids = {m: self._ids(c) for m, c in cues.items() if c}
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def _human(self, text: str) -> list[int]:
        out: list[int] = []
        rest = text
        while True:
            hits = [(rest.find(PLACEHOLDERS[m]), m) for m in self.ids if PLACEHOLDERS[m] in rest]
            if not hits:
                break
            pos, modality = min(hits)
            if rest[:pos]:
                out += self.tok(rest[:pos], add_special_tokens=False)["input_ids"]
            out += self.cue_ids.get(modality, []) + [self.ids[modality]] * self.num_tokens[modality]
            rest = rest[pos + len(PLACEHOLDERS[modality]) :]
        if rest:
            out += self.tok(rest, add_special_tokens=False)["input_ids"]
        return out

    def encode(self, conversations: list[dict], for_generation: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation; with `for_generation`, the prompt up to the last answer."""
        ids, labels = list(self.bos), [-100] * len(self.bos)
        turns = conversations[:-1] if for_generation else conversations
        for turn in turns:
            if turn["from"] == "human":
                piece = self._ids(f"{USER} ") + self._human(turn["value"]) + self._ids(f"\n{ASSISTANT}")
                ids += piece
                labels += [-100] * len(piece)
            else:
                answer = self.tok(" " + turn["value"].strip(), add_special_tokens=False)["input_ids"] + [self.eos]
                ids += answer
                labels += answer
                newline = self._ids("\n")
                ids += newline
                labels += [-100] * len(newline)
        if for_generation:
            last = conversations[-1]
            if last["from"] == "human":  # a prompt without its answer
                piece = self._ids(f"{USER} ") + self._human(last["value"]) + self._ids(f"\n{ASSISTANT}")
                ids += piece
            labels = [-100] * len(ids)
        return ids, labels

    def decode_answer(self, token_ids: list[int]) -> str:
        """Text of generated ids up to the first end-of-sequence token."""
        if self.eos in token_ids:
            token_ids = token_ids[: token_ids.index(self.eos)]
        return self.tok.decode(token_ids, skip_special_tokens=True).strip()
