"""Language retention on real text (P1's NLU and NLG): probes built from English prose that ships with Python, and
the log-likelihood scorer that evaluates them, and any multiple-choice task, through any backend's forward.

The probes are two evaluate-only tasks on disk (`mmcl/eval/probes/{nlu,nlg}`, LLaVA-format records with stable ids,
so the pre-flight leak check sees them like any test record), built once by `write_probes` from the prose of
`pydoc_data.topics` (the Python language reference's help topics; PSF licence) and shipped, so every machine and
Python version scores the same text:

- **nlu** (`scorer: loglik_choice`): cloze multiple choice. The prompt is a sentence without its last word; the
  choices are that word and three last words of other sentences. The model picks the choice with the highest
  log-likelihood given the prompt (lm-eval's `acc`); chance is 25. Score: % correct.
- **nlg** (`scorer: loglik_perplexity`): the first third of a sentence is the prompt, the rest is the text scored.
  Score = 100 * exp(-(total negative log-likelihood in nats) / (total UTF-8 bytes of the scored text)) = 100 / the
  per-byte perplexity: the geometric mean probability per byte, 0-100, higher is better (a model at 1 bit per
  byte scores 50). Per byte rather than per token, so models with different tokenizers compare.

Both read the text plain (`format: plain`, no chat template, as lm-evaluation-harness does); a task with
`format: chat` wraps prompt and option in the model's own conversation format instead (`Processor.encode`, labels on
the option tokens only).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from mmcl.data.records import CHOICE_SCORER, PROBES_DIR, Record, Task
from mmcl.eval.generate import TaskResult
from mmcl.models.base import MLLM, Processor

__all__ = ["CHOICE_SCORER", "PERPLEXITY_SCORER", "PROBE_ROOT", "continuation_logprobs", "encode_chat",
           "encode_plain", "evaluate_language_task", "is_language_task", "probe_items", "write_probes"]

PROBE_ROOT = PROBES_DIR
PERPLEXITY_SCORER = "loglik_perplexity"
LANGUAGE_SCORERS = (CHOICE_SCORER, PERPLEXITY_SCORER)
DISTRACTORS = 3
NLG_SHARE = 3  # one paragraph in NLG_SHARE goes to the NLG probe, the others to the NLU probe

# -- building the probes (once; the result is shipped in mmcl/eval/probes) --------------------------------------------

_CODE = re.compile(r"[_=<>\[\]{}*|\\/@#$%^~`]")  # sentences with code-like characters are not prose
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()


def _paragraphs(text: str):
    """Prose paragraphs of a help topic, lines joined: indented blocks (code, grammar) and headings are skipped."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line.startswith(" ") for line in lines) or any(set(line.strip()) <= set("*=-") for line in lines):
            continue
        yield " ".join(line.strip() for line in lines)


def _prose(sentence: str) -> bool:
    words = sentence.split()
    return 6 <= len(words) <= 40 and sentence.endswith(".") and not _CODE.search(sentence)


def probe_items(topics: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """NLU and NLG records from help topics (name -> text), deterministic: a paragraph goes to NLG or NLU by a hash
    of its text, so no sentence is in both; repeated paragraphs are taken once."""
    seen: set[str] = set()
    cloze: list[tuple[str, str, str]] = []  # (topic, prompt, last word)
    nlg: list[dict] = []
    for topic in sorted(topics):
        for para in _paragraphs(topics[topic]):
            if para in seen:
                continue
            seen.add(para)
            to_nlg = int(_digest(para), 16) % NLG_SHARE == 0
            for sentence in _SENTENCE_END.split(para):
                if not _prose(sentence):
                    continue
                words = sentence.split()
                if to_nlg:
                    cut = max(2, len(words) // 3)
                    prompt, rest = " ".join(words[:cut]), " ".join(words[cut:])
                    nlg.append({"id": f"nlg-{_digest(sentence)}", "conversations": _turns(prompt, rest),
                                "source": f"pydoc_data.topics[{topic!r}]"})
                elif re.fullmatch(r"[a-z]{3,}", words[-1][:-1]):
                    cloze.append((topic, " ".join(words[:-1]), words[-1][:-1]))
    vocabulary = sorted({word for _, _, word in cloze})
    nlu = []
    for topic, prompt, word in cloze:
        rng = random.Random(int(_digest(prompt + " " + word), 16))
        others = [w for w in vocabulary if w != word]
        choices = rng.sample(others, min(DISTRACTORS, len(others))) + [word]
        rng.shuffle(choices)
        nlu.append({"id": f"nlu-{_digest(prompt + ' ' + word)}", "conversations": _turns(prompt, word),
                    "choices": choices, "source": f"pydoc_data.topics[{topic!r}]"})
    return _unique(nlu), _unique(nlg)


def _turns(prompt: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def _unique(items: list[dict]) -> list[dict]:
    out, ids = [], set()
    for item in items:
        if item["id"] not in ids:
            ids.add(item["id"])
            out.append(item)
    return out


_MANIFESTS = {
    "nlu": {"name": "probe-nlu", "modality": "text", "type": "mcq", "scorer": CHOICE_SCORER, "format": "plain",
            "description": "NLU probe: cloze multiple choice (true last word vs 3 others) on Python reference prose; "
                           "% correct by option log-likelihood, chance 25"},
    "nlg": {"name": "probe-nlg", "modality": "text", "type": "qa", "scorer": PERPLEXITY_SCORER, "format": "plain",
            "description": "NLG probe: Python reference prose; 100 / per-byte perplexity of each sentence's last two "
                           "thirds given its first third (higher is better)"},
}


def write_probes(out: Path, topics: dict[str, str] | None = None) -> dict[str, Path]:
    """Write the probe tasks (`out/nlu`, `out/nlg`: task.yaml + test.jsonl) from `topics` (default: this Python's
    `pydoc_data.topics`); returns name -> task directory. mmcl ships the output of this under Python 3.11."""
    import yaml

    if topics is None:
        from pydoc_data.topics import topics
    nlu, nlg = probe_items(topics)
    dirs = {}
    for name, items in (("nlu", nlu), ("nlg", nlg)):
        d = Path(out) / name
        d.mkdir(parents=True, exist_ok=True)
        manifest = {**_MANIFESTS[name], "splits": {"test": "test.jsonl"},
                    "source": f"pydoc_data.topics of Python {platform.python_version()}; {len(items)} records"}
        (d / "task.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        (d / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
        dirs[name] = d
    return dirs


# -- log-likelihood scoring -------------------------------------------------------------------------------------------


def prefix_token_id(tokenizer) -> int:
    """The token a text with no context is conditioned on (lm-evaluation-harness's rule: bos, else eos)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("the tokenizer has neither a bos nor an eos token to start a text without context")
    return int(tid)


def encode_plain(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a plain-text context and its continuation, as lm-evaluation-harness splits them: the context's
    trailing spaces move to the continuation, the whole text is tokenized once and the continuation is what follows
    the context's own tokens (so a token spanning the boundary is not split); an empty context becomes the prefix
    token."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    if not context:
        return [prefix_token_id(tokenizer)], ids(continuation)
    whole, head = ids(context + continuation), ids(context)
    return head, whole[len(head):]


def encode_chat(processor: Processor, prompt: str, option: str) -> tuple[list[int], list[int]]:
    """Context and option ids in the model's conversation format (`Processor.encode` of prompt + option as the
    answer): the context is everything before the supervised tokens, the option is the supervised tokens without
    the end-of-answer tokens that follow it."""
    ids, labels = processor.encode([{"from": "human", "value": prompt}, {"from": "gpt", "value": option}])
    supervised = [i for i, lab in enumerate(labels) if lab != -100]
    if not supervised:
        raise ValueError(f"the processor supervised no token of the option {option!r}")
    start, end = supervised[0], supervised[-1] + 1
    while end > start + 1 and ids[end - 1] in processor.eos_ids:
        end -= 1
    return ids[:start], ids[start:end]


@torch.no_grad()
def continuation_logprobs(model: MLLM, pairs: Sequence[tuple[list[int], list[int]]], *, pad_id: int,
                          batch_size: int, device: torch.device, max_length: int | None = None
                          ) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation given the context,
    and whether greedy decoding would have produced it, from the model's own forward on text-only batches (the
    labels are the continuation tokens only). A sequence whose input (all but its last token) is over `max_length`
    loses tokens from the left of its context. Pairs are batched by length; results come back in input order."""
    if any(not cont for _, cont in pairs):
        raise ValueError("a continuation must have at least one token")
    seqs = []  # (context + continuation, continuation length); the last token is a target only, never an input
    for ctx, cont in pairs:
        full = list(ctx) + list(cont)
        if max_length and len(full) > max_length + 1:
            if len(cont) > max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens is over the model's {max_length} positions")
            full = full[len(full) - max_length - 1:]
        if len(full) < 2:
            raise ValueError("a continuation needs a context of at least one token (e.g. the prefix token)")
        seqs.append((full, len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(seqs[i][0]) for i in idx) - 1
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(seqs[i][0]) - 1] = torch.tensor(seqs[i][0][:-1])
                mask[row, :len(seqs[i][0]) - 1] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(ids, mask, **model.media_inputs([{} for _ in idx], ids)).logits
            for row, i in enumerate(idx):
                full, n = seqs[i]
                target = torch.tensor(full[-n:], device=device)
                # position t predicts token t + 1; the softmax runs over the continuation's positions only (a real
                # vocabulary makes it the costly part otherwise)
                pred = torch.log_softmax(logits[row, len(full) - n - 1:len(full) - 1].float(), dim=-1)
                out[i] = (float(pred.gather(-1, target[:, None]).sum()), bool((pred.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return out


def is_language_task(task: Task) -> bool:
    """Scored by log-likelihood (`loglik_choice`, `loglik_perplexity`) rather than by generating answers."""
    return task.scorer in LANGUAGE_SCORERS


def model_max_length(model: MLLM) -> int | None:
    """The language model's maximum positions (None when its config does not say)."""
    lm = getattr(model, "language_model", None)
    cfg = getattr(lm, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def evaluate_language_task(model: MLLM, processor: Processor, task: Task, records: Sequence[Record], *,
                           batch_size: int, device: torch.device) -> TaskResult:
    """Score a `loglik_choice` or `loglik_perplexity` task on `records` (the first `task.limit` of them, if set;
    0-100, higher is better, see the module docstring); per-record predictions carry the log-likelihoods."""
    def encode(prompt: str, answer: str) -> tuple[list[int], list[int]]:
        if task.format == "chat":
            return encode_chat(processor, prompt, answer)
        return encode_plain(processor.tokenizer, prompt, answer if not prompt else " " + answer)

    records = records[:task.limit] if task.limit else records
    common = dict(pad_id=processor.pad_id, batch_size=batch_size, device=device, max_length=model_max_length(model))
    prompts = [r.conversations[-2]["value"] for r in records]
    if task.scorer == CHOICE_SCORER:
        pairs = [encode(p, c) for p, r in zip(prompts, records) for c in r.choices]
        flat = continuation_logprobs(model, pairs, **common)
        preds, at = [], 0
        for prompt, r in zip(prompts, records):
            lls = [ll for ll, _ in flat[at:at + len(r.choices)]]
            at += len(r.choices)
            chosen = r.choices[max(range(len(lls)), key=lambda k: lls[k])]
            preds.append({"id": r.id, "prompt": prompt, "prediction": chosen, "references": [r.answer],
                          "score": 100.0 if chosen == r.answer else 0.0, "choices": r.choices,
                          "loglik": [round(x, 4) for x in lls]})
        score = sum(p["score"] for p in preds) / max(len(preds), 1)
        return TaskResult(task.name, score, preds)
    if task.scorer != PERPLEXITY_SCORER:
        raise ValueError(f"{task.manifest}: scorer {task.scorer!r} is not a log-likelihood scorer")
    flat = continuation_logprobs(model, [encode(p, r.answer) for p, r in zip(prompts, records)], **common)
    preds, nll_total, bytes_total = [], 0.0, 0
    for prompt, r, (ll, _) in zip(prompts, records, flat):
        n_bytes = len((" " + r.answer if prompt else r.answer).encode("utf-8"))
        nll_total, bytes_total = nll_total - ll, bytes_total + n_bytes
        per_byte = -ll / n_bytes
        preds.append({"id": r.id, "prompt": prompt, "prediction": f"nll/byte {per_byte:.4f}",
                      "references": [r.answer], "score": 100.0 * math.exp(-per_byte), "loglik": round(ll, 4),
                      "bytes": n_bytes})
    score = 100.0 * math.exp(-nll_total / bytes_total) if bytes_total else 0.0
    return TaskResult(task.name, score, preds)
