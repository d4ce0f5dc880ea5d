"""The shared core of native Hugging Face VLM backends: a checkpoint's own chat template turns LLaVA conversations into
ids and labels (`NativeProcessor`), the HF model runs behind mmcl's `MLLM` surface (`NativeVLM`), and `load_native`
opens a directory saved with `save_pretrained`. A `Family` (families_*.py) adds only what differs per model type:
media preprocessing and where the parts live."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.models.base import MLLM, Media, MediaItem, ModelLoadError, Processor, refuse_pickles
from mmcl.models.hf.family import FAMILIES, Family

MARKERS = {"<image>": "image", "<video>": "video", "<audio>": "audio"}
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in MARKERS) + ")")
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _squash(text: str) -> str:
    return "".join(text.split())


class NativeProcessor(Processor):
    """LLaVA conversations -> ids and labels through the checkpoint's chat template, media through the family.

    Each answer is cut out of the rendered text by prefix difference (the prompt is the template's rendering with the
    generation prompt, the answer what the next turn adds to it), and the pieces are tokenized separately, so an
    evaluation prompt is an exact token prefix of the training sequence. Labels cover each answer and its
    end-of-turn token; a template that writes no end token after answers gets the tokenizer's eos appended.
    """

    def __init__(self, family: Family, tokenizer: Any, chat_template: str | None = None, *,
                 template_source: str = "the chat template", extra_eos: Sequence[int] = ()) -> None:
        self.family = family
        self.tokenizer = tokenizer
        self.modalities = tuple(family.modalities)
        self.chat_template = chat_template
        self.template_source = template_source if chat_template is not None else "mmcl's USER/ASSISTANT format"
        self._placeholder_ids = {m: self._single_id(family.placeholder_token(m)) for m in self.modalities}
        self._special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._lead = self._leading_specials()
        eot = self._end_of_turn_id()
        self.eos_ids = self._dedupe([tokenizer.eos_token_id, eot, *extra_eos])
        self.encode(self._probe())  # fail at load, not mid-run, on a template mmcl cannot cut into turns

    @staticmethod
    def _dedupe(ids: Sequence[int | None]) -> list[int]:
        out: list[int] = []
        for i in ids:
            if i is not None and int(i) not in out:
                out.append(int(i))
        return out

    def _single_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ModelLoadError(f"the tokenizer splits the placeholder {token!r} into {len(ids)} tokens; it must be "
                                 "one (added) token of the checkpoint's vocabulary")
        return ids[0]

    def _leading_specials(self) -> list[int]:
        """Ids the tokenizer puts before any text (e.g. Llama's <s>), which a template may not write itself."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if plain and full[start : start + len(plain)] == plain:
                return full[:start]
        return []

    def _end_of_turn_id(self) -> int | None:
        """The first special token the template writes after an answer (<|im_end|>, <end_of_turn>, ...), if any."""
        pieces = self._pieces(self._messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]))
        answer = next(text for text, is_answer in pieces if is_answer)
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return next((i for i in answer_ids if i in self._special_ids), None)

    def _probe(self) -> list[dict]:
        items = "".join(f"<{m}>" for m in self.modalities)
        return [{"from": "human", "value": items + "\nwhat colour is the shape?"}, {"from": "gpt", "value": "red"},
                {"from": "human", "value": "how many?"}, {"from": "gpt", "value": "two"}]

    def placeholder_id(self, modality: str) -> int:
        return self._placeholder_ids[modality]

    # -- conversations -> chat messages -> rendered pieces --------------------------------------------------------

    def _messages(self, conversations: list[dict]) -> list[dict]:
        """LLaVA turns as chat messages; `<image>`/`<video>`/`<audio>` in human turns become content items in place."""
        out = []
        for turn in conversations:
            role = ROLES.get(turn["from"])
            if role is None:
                raise ValueError(f"unknown conversation role {turn['from']!r} (expected human, gpt or system)")
            value = turn["value"]
            if role != "user":
                out.append({"role": role, "content": [{"type": "text", "text": value.strip()}]})
                continue
            content: list[dict] = []
            for part in _MARKER_RE.split(value):
                if part in MARKERS:
                    modality = MARKERS[part]
                    if modality not in self.modalities:
                        raise ValueError(f"the model reads {sorted(self.modalities)}; the conversation has {part}")
                    content.append(self.family.content_item(modality))
                elif part.strip():
                    content.append({"type": "text", "text": part.strip()})
            out.append({"role": role, "content": content})
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Text of `messages` through the chat template (or mmcl's plain format when the checkpoint has none)."""
        if self.chat_template is None:
            return self._render_plain(messages)
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _render_plain(self, messages: list[dict]) -> str:
        """mmcl's format (as `ConversationFormat`): `<bos>USER: {text}\\nASSISTANT: {answer}<eos>\\n` per round."""
        tok = self.tokenizer
        text = tok.bos_token or ""
        for m in messages:
            parts = [c["text"] if c.get("type") == "text" else self.family.fallback_placeholder_text(c["type"])
                     for c in m["content"]]
            if m["role"] == "system":
                text += " ".join(parts) + "\n"
            elif m["role"] == "user":
                text += "USER: " + "\n".join(parts) + "\nASSISTANT:"
            else:
                text += " " + " ".join(parts) + (tok.eos_token or "") + "\n"
        return text

    def _pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """(text, is_answer) pieces whose concatenation is the rendered conversation up to its last answer."""
        pieces: list[tuple[str, bool]] = []
        done = ""
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], add_generation_prompt=True)
            full = self.render(messages[: k + 1])
            if not full.startswith(prompt):
                prompt = self._tolerant_prompt(prompt, full, msg["content"][0]["text"])
            if not prompt.startswith(done):
                raise ModelLoadError(
                    f"{self.template_source}: the prompt of answer {k} does not start with the rendered conversation "
                    f"before it ({done[-40:]!r} vs {prompt[max(0, len(done) - 40):][:80]!r}); "
                    "mmcl needs each turn's rendering to extend the previous one")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return pieces

    def _tolerant_prompt(self, prompt: str, full: str, answer: str) -> str:
        """A generation prompt that differs from the template's own rendering of the assistant header only in
        whitespace (llava-hf OneVision: "assistant \\n" in turns, "assistant\\n" as generation prompt) is replaced
        by that rendering, so training and evaluation share one prompt; any other mismatch is an error."""
        at = full.rfind(answer) if answer else -1
        if at >= 0 and _squash(full[:at]) == _squash(prompt):
            return full[:at]
        raise ModelLoadError(
            f"{self.template_source}: the generation prompt ({prompt[-60:]!r}) is not a prefix of the conversation "
            f"with its answer ({full[-80:]!r}); mmcl cuts answers out of the rendered text by prefix difference. "
            "Fix the template (chat_template.jinja) so that render(turns, add_generation_prompt=True) is a prefix of "
            "render(turns + [answer])")

    # -- tokens ---------------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _answer(self, text: str) -> tuple[list[int], list[int]]:
        """Ids and labels of an answer piece: supervised up to and including its first end token; without one, the
        stripped answer plus eos is supervised and trailing whitespace is not."""
        ids = self._ids(text)
        ends = set(self.eos_ids)
        for i, t in enumerate(ids):
            if t in ends:
                return ids, ids[: i + 1] + [-100] * (len(ids) - i - 1)
        stripped = text.rstrip()
        head = self._ids(stripped) + [self.tokenizer.eos_token_id]
        tail = self._ids(text[len(stripped):])
        return head + tail, head + [-100] * len(tail)

    def encode(self, conversations: list[dict], for_generation: bool = False) -> tuple[list[int], list[int]]:
        messages = self._messages(conversations)
        if not for_generation and not any(m["role"] == "assistant" for m in messages):
            raise ValueError("a training conversation needs at least one gpt answer")
        pieces = self._pieces(messages)
        if for_generation:
            if messages and messages[-1]["role"] == "assistant":
                pieces = pieces[:-1]  # the prompt of the last answer, exactly as in training
            else:  # ends with a question: its generation prompt after the last answered round
                done = "".join(t for t, _ in pieces)
                prompt = self.render(messages, add_generation_prompt=True)
                if not prompt.startswith(done):
                    raise ModelLoadError(f"{self.template_source}: the last question's prompt does not extend the "
                                         "rendered conversation before it")
                pieces.append((prompt[len(done):], False))
        text = "".join(t for t, _ in pieces)
        lead = [] if self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token) else list(self._lead)
        ids, labels = list(lead), [-100] * len(lead)
        for piece, is_answer in pieces:
            if is_answer:
                a_ids, a_labels = self._answer(piece)
                ids += a_ids
                labels += a_labels
            else:
                p = self._ids(piece)
                ids += p
                labels += [-100] * len(p)
        if for_generation:
            labels = [-100] * len(ids)
        self._check_placeholders(conversations, ids, for_generation)
        return ids, labels

    def _check_placeholders(self, conversations: list[dict], ids: list[int], for_generation: bool) -> None:
        answered = [i for i, t in enumerate(conversations) if t["from"] == "gpt"]
        if for_generation:  # the prompt: everything but a final answer
            turns = conversations[:-1] if answered and answered[-1] == len(conversations) - 1 else conversations
        else:  # the training sequence ends with the last answer
            turns = conversations[: answered[-1] + 1]
        for marker, modality in MARKERS.items():
            if modality not in self.modalities:
                continue
            want = sum(t["value"].count(marker) for t in turns if t["from"] == "human")
            got = ids.count(self._placeholder_ids[modality])
            if want != got:
                raise ValueError(f"{self.template_source} wrote {got} {self.family.placeholder_token(modality)!r} "
                                 f"tokens for {want} {marker} items; each item must appear exactly once")

    def load_media(self, modality: str, path: Path) -> MediaItem:
        return self.family.load_media(modality, Path(path))


class NativeVLM(MLLM):
    """A Hugging Face `*ForConditionalGeneration` model behind mmcl's `MLLM` surface: `self.hf` is the HF model, the
    family says where the parts live and how media are batched."""

    def __init__(self, hf: nn.Module, family: Family) -> None:
        super().__init__()
        self.hf = hf
        self.native_family = family
        self.family = family.model_types[0] if family.model_types else type(family).__name__
        self.separable_projector = family.separable_projector

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.native_family.modalities)

    def _lm_parent(self) -> tuple[nn.Module, str]:
        *path, last = self.native_family.language_model_path
        parent = self.hf
        for name in path:
            parent = getattr(parent, name)
        return parent, last

    @property
    def language_model(self) -> nn.Module:
        parent, name = self._lm_parent()
        return getattr(parent, name)

    @language_model.setter
    def language_model(self, module: nn.Module) -> None:
        parent, name = self._lm_parent()
        setattr(parent, name, module)

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module.__setattr__ would register a module value as a new child of this wrapper and never reach the
        # property; `vlm.language_model = peft_model` must replace the submodule inside the HF model instead
        if name == "language_model":
            type(self).language_model.fset(self, value)
        else:
            super().__setattr__(name, value)

    def parts(self) -> dict[str, dict[str, nn.Module]]:
        parts = self.native_family.parts(self.hf)
        parts["language_model"]["lm"] = self.language_model
        return parts

    def output_embeddings(self) -> nn.Module | None:
        return self.hf.get_output_embeddings()

    def media_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, Any]:
        return self.native_family.media_inputs(media, input_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **media_kwargs: Any):
        """The HF model's output (`.logits` aligned with `input_ids`); no labels, so no HF-side loss."""
        media_kwargs.setdefault("use_cache", False)
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, **media_kwargs)

    @torch.no_grad()
    def generate_new(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                     **kwargs: Any) -> torch.Tensor:
        """Greedy decoding from left-padded prompts; only the new tokens, whether `hf.generate` echoes the prompt
        (decoder-only families) or not."""
        out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                               do_sample=False, **kwargs)
        out = out if isinstance(out, torch.Tensor) else out.sequences  # a checkpoint may ask for dict outputs
        width = input_ids.shape[1]
        if out.shape[1] >= width and torch.equal(out[:, :width], input_ids.to(out.device)):
            return out[:, width:]
        return out


# -- loading ------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def find_chat_template(path: Path, tokenizer: Any) -> tuple[str | None, str]:
    """The checkpoint's chat template and where it came from: chat_template.jinja, chat_template.json
    ("chat_template"), then the tokenizer's own; (None, ...) when there is none."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), str(jinja)
    js = path / "chat_template.json"
    if js.is_file():
        value = _read_json(js).get("chat_template")
        if value:
            return _default_template(value), str(js)
    value = getattr(tokenizer, "chat_template", None)
    if value:
        return _default_template(value), f"the chat template in {path / 'tokenizer_config.json'}"
    return None, "mmcl's USER/ASSISTANT format"


def _default_template(value: Any) -> str:
    """A template given as a name -> template mapping (or a list of {name, template}) reduced to its default."""
    if isinstance(value, list):
        value = {t["name"]: t["template"] for t in value}
    if isinstance(value, dict):
        return value.get("default", next(iter(value.values())))
    return value


def load_native(path: str | Path, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                trust_remote_code: bool = False) -> tuple[NativeVLM, NativeProcessor]:
    """Open a Hugging Face VLM directory (config.json, safetensors weights, tokenizer, preprocessor_config.json, chat
    template) saved with `save_pretrained`; every refusal is a `ModelLoadError` naming the file or field."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; point model.path at a directory saved with "
                             "model.save_pretrained(dir)")
    raw = _read_json(config_file)
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ModelLoadError(f"{config_file}: model_type {model_type!r} is not a native family mmcl supports "
                             f"(supported: {', '.join(sorted(FAMILIES))})")
    if raw.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(f"{config_file} has auto_map (the checkpoint ships its own Python code); mmcl does not "
                             "run it unless you set model.trust_remote_code=true, and only do that if you trust it")
    refuse_pickles(path, allow_pickle)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); save the tokenizer "
                             "next to the model with tokenizer.save_pretrained(dir)")
    if not (path / "preprocessor_config.json").is_file():
        raise ModelLoadError(f"{path} has no preprocessor_config.json (the image/audio processor settings); save "
                             "the processor next to the model with processor.save_pretrained(dir)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    family = FAMILIES[model_type](path, config, tokenizer)
    model_cls = getattr(transformers, family.model_class)
    hf = model_cls.from_pretrained(path, dtype=dtype, use_safetensors=True if not allow_pickle else None,
                                   trust_remote_code=trust_remote_code)
    hf.eval()
    template, source = find_chat_template(path, tokenizer)
    gen_eos: list[int] = []
    if (path / "generation_config.json").is_file():
        eos = _read_json(path / "generation_config.json").get("eos_token_id")
        gen_eos = [eos] if isinstance(eos, int) else list(eos or [])
    processor = NativeProcessor(family, tokenizer, template, template_source=source, extra_eos=gen_eos)
    vlm = NativeVLM(hf, family)
    hf.generation_config.eos_token_id = list(processor.eos_ids)
    hf.generation_config.pad_token_id = processor.pad_id
    return vlm, processor


def register_native_backends() -> None:
    """Register `load_native` for every family known so far (called once the family modules are imported)."""
    from mmcl.models.base import register_backend

    register_backend(*FAMILIES)(load_native)
