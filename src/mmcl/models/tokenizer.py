"""Tokenizers: a byte-level BPE trained on the built-in world's text, and the conversation format shared by training
and evaluation (so the answer a model is trained to write is exactly what evaluation asks it to generate)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ChatTurns:
    """The text around a conversation's turns. The default is mmcl's plain format (`<s>USER: ...\\nASSISTANT:
    answer</s>\\n`); `from_template` reads the same pieces off a tokenizer's own chat template (e.g. SmolLM2's
    `<|im_start|>user ... <|im_end|>`), so a language model trains and answers in the format it was tuned on."""

    start: str = ""  # before the first user turn (a template's system block)
    user: str = f"{USER} "  # opens each user turn
    assistant: str = f"\n{ASSISTANT}"  # closes a user turn and opens the answer
    answer_prefix: str = " "  # put before the answer text when it is tokenized
    end: str | None = None  # supervised text that closes an answer; None = the tokenizer's eos token id
    after: str = "\n"  # unsupervised text after an answer
    bos: bool = True  # start with the tokenizer's bos token (a template writes its own)

    @classmethod
    def from_template(cls, tokenizer: PreTrainedTokenizerFast) -> ChatTurns:
        """The pieces of the tokenizer's chat template, found by rendering a two-round conversation of sentinels;
        a template whose rounds are not all alike (or whose answer does not end in the eos token) is refused."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        u1, a1, u2, a2 = "\x01U1\x01", "\x01A1\x01", "\x01U2\x01", "\x01A2\x01"
        rounds = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                  {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
        text = tokenizer.apply_chat_template(rounds, tokenize=False)
        head, rest = text.split(u1)
        close1, rest = rest.split(a1)
        between, rest = rest.split(u2)
        close2, tail = rest.split(a2)
        eos = tokenizer.eos_token or ""
        user = between[len(tail):] if between.startswith(tail) else None
        prompt = tokenizer.apply_chat_template(rounds[:1], tokenize=False, add_generation_prompt=True)
        if close1 != close2 or user is None or not head.endswith(user) or not eos or not tail.startswith(eos) \
                or prompt != head + u1 + close1:
            raise ValueError("the tokenizer's chat template does not repeat the same text around every round; "
                             "use the plain format (leave chat_template off)")
        return cls(start=head[:len(head) - len(user)], user=user, assistant=close1, answer_prefix="", end=eos,
                   after=tail[len(eos):], bos=False)


class ConversationFormat:
    """Turns LLaVA conversations into token ids and labels: `<s>USER: ...\\nASSISTANT: answer</s>\\n...`.

    Pieces are tokenized separately and concatenated, so the prompt of an evaluation sample is a byte-exact prefix
    of its training sequence; placeholders are expanded to one token per feature position. Labels are -100 except
    on assistant answers and their end-of-sequence token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, num_tokens: dict[str, int], cues: dict[str, str],
                 turns: ChatTurns | None = None):
        self.tok = tokenizer
        self.turns = turns or ChatTurns()
        self.num_tokens = num_tokens
        self.ids = {m: tokenizer.convert_tokens_to_ids(p) for m, p in PLACEHOLDERS.items() if m in num_tokens}
        self._cache: dict[str, list[int]] = {}
        self.cue_ids = {m: self._ids(c) for m, c in cues.items() if c}
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and self.turns.bos else []
        self.bos += self._ids(self.turns.start) if self.turns.start else []
        self.eos = tokenizer.eos_token_id
        self.end = self._ids(self.turns.end) if self.turns.end is not None else [self.eos]

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

    def _user_turn(self, text: str) -> list[int]:
        return self._ids(self.turns.user) + self._human(text) + self._ids(self.turns.assistant)

    def encode(self, conversations: list[dict], for_generation: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation; with `for_generation`, the prompt up to the last answer."""
        ids, labels = list(self.bos), [-100] * len(self.bos)
        turns = conversations[:-1] if for_generation else conversations
        for turn in turns:
            if turn["from"] == "human":
                piece = self._user_turn(turn["value"])
                ids += piece
                labels += [-100] * len(piece)
            else:
                text = self.turns.answer_prefix + turn["value"].strip()
                answer = self.tok(text, add_special_tokens=False)["input_ids"] + self.end
                ids += answer
                labels += answer
                after = self._ids(self.turns.after) if self.turns.after else []
                ids += after
                labels += [-100] * len(after)
        if for_generation:
            last = conversations[-1]
            if last["from"] == "human":  # a prompt without its answer
                ids += self._user_turn(last["value"])
            labels = [-100] * len(ids)
        return ids, labels

    def decode_answer(self, token_ids: list[int]) -> str:
        """Text of generated ids up to the first end-of-sequence token."""
        stops = [i for i, t in enumerate(token_ids) if t in (self.eos, self.end[0])]
        if stops:
            token_ids = token_ids[: stops[0]]
        return self.tok.decode(token_ids, skip_special_tokens=True).strip()
