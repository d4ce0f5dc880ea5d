"""MoInCL's text-only instructions for IKD: the built-in set (disjoint from every evaluated record of the world) or
a user's file (P4 uses Natural Instructions). The leading underscore keeps the strategy auto-import away."""

from __future__ import annotations

import json
from pathlib import Path

from mmcl.data.records import MODALITIES, PLACEHOLDER

BUILTIN = "the built-in instruction set (mmcl.data.synth.instructions)"


def builtin_instructions() -> list[list[dict]]:
    """The world's own instruction pool as conversations (one human turn each)."""
    from mmcl.data.synth.instructions import instruction_pool

    return [[{"from": "human", "value": p}] for p in instruction_pool()]


def load_instructions(path: str | Path) -> list[list[dict]]:
    """Text-only instructions from a JSONL file or a JSON list, as prompts (conversations ending with a human turn;
    a trailing answer in the file is dropped: IKD distils, or asks for, the previous model's own answer)."""
    path = Path(path).expanduser()
    text = path.read_text()
    try:
        if text.lstrip().startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSONL or a JSON list: {e}") from e
    out = []
    for i, item in enumerate(items):
        where = f"{path}: item {i + 1}"
        if isinstance(item, dict) and "conversations" in item:
            conv = item["conversations"]
            if not (isinstance(conv, list) and conv and all(isinstance(t, dict) and "value" in t for t in conv)):
                raise ValueError(f"{where}: 'conversations' must be a list of turns with 'from' and 'value'")
            if conv[-1].get("from") != "human":
                conv = conv[:-1]  # an instruction is a prompt: IKD distils (or asks for) the teacher's answer
            if not conv:
                raise ValueError(f"{where}: 'conversations' has no human turn")
        else:
            if isinstance(item, str):
                prompt = item
            elif isinstance(item, dict):
                head = next((item[k] for k in ("prompt", "instruction", "definition", "text") if k in item), None)
                if not isinstance(head, str):
                    raise ValueError(f"{where}: needs a string 'prompt', 'instruction', 'definition' or 'text' "
                                     "(or 'conversations')")
                extra = item.get("input")
                prompt = head if not extra else f"{head}\n{extra}"
            else:
                raise ValueError(f"{where}: expected a string or an object, got {type(item).__name__}")
            if not prompt.strip():
                raise ValueError(f"{where}: empty instruction")
            conv = [{"from": "human", "value": prompt}]
        human = "".join(str(t["value"]) for t in conv if t.get("from") == "human")
        marks = [PLACEHOLDER[m] for m in MODALITIES if PLACEHOLDER[m] in human]
        if marks:
            raise ValueError(f"{where}: IKD instructions are text-only, but it contains {marks[0]}")
        out.append(conv)
    if not out:
        raise ValueError(f"{path}: no instructions")
    return out
