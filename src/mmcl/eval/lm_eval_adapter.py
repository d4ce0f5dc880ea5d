"""lm-evaluation-harness as a retention task: a stream's `lm_eval:TASKS` entry scores the current model at every row
through lm-eval's Python API (`simple_evaluate`), so P1's language benchmarks (WSC273, WinoGrande, ARC, LAMBADA, ...)
run on the model being trained, unchanged, wherever their datasets can be reached.

`MMCLLanguageModel` is an `lm_eval.api.model.LM` over mmcl's model and tokenizer: text-only batches through the
model's own forward (any backend: composition or native Hugging Face), plain text as lm-eval hands it over (no chat
template), log-likelihoods from `mmcl.eval.language.continuation_logprobs`. A task file (YAML) of the stream is
read with its relative `data_files` resolved against its own folder, so a local task over a local JSONL runs offline.

The matrix score of a task (0-100, higher is better) is its first metric that lm-eval marks higher-is-better, times
100 when it lies in [0, 1]; a task with only perplexity metrics scores 100 / perplexity (byte_perplexity first,
then word_perplexity), or 100 * 2^-bits_per_byte, as the NLG probe does. Every metric is in the predictions file.
lm-eval is an optional extra: `pip install 'mmcl[lmeval]'`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch

from mmcl.data.records import DataError, Task
from mmcl.eval.generate import TaskResult
from mmcl.eval.language import continuation_logprobs, encode_plain, model_max_length, prefix_token_id
from mmcl.models.base import MLLM, Processor

__all__ = ["evaluate_lm_eval_task", "language_model", "matrix_score"]

INSTALL = "pip install 'mmcl[lmeval]' (lm-eval==0.4.13)"
PERPLEXITIES = ("byte_perplexity", "word_perplexity")


def _harness():
    try:
        import lm_eval
    except ImportError as e:
        raise DataError(f"lm_eval: retention entries need lm-evaluation-harness, which is not installed ({e}); "
                        f"install it with {INSTALL}") from None
    return lm_eval


@functools.cache
def _model_class() -> type:
    """The `LM` subclass, defined on first use so that mmcl imports without lm-eval installed."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class MMCLLanguageModel(LM):
        """mmcl's model and tokenizer as an lm-eval model: loglikelihood, loglikelihood_rolling, generate_until."""

        def __init__(self, model: MLLM, processor: Processor, batch_size: int, device: torch.device,
                     max_length: int | None = None):
            super().__init__()
            self.model, self.processor, self.tok = model, processor, processor.tokenizer
            self.batch_size, self._device = batch_size, device
            self.max_length = max_length or 2048

        def _logprobs(self, pairs):
            return continuation_logprobs(self.model, pairs, pad_id=self.processor.pad_id, batch_size=self.batch_size,
                                         device=self._device, max_length=self.max_length)

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self._logprobs([encode_plain(self.tok, *r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Each text scored whole, in windows of the model's length, every token predicted once (lm-eval's
            rolling windows, conditioned on the prefix token)."""
            owner, pairs = [], []
            for k, r in enumerate(requests):
                ids = self.tok(r.args[0], add_special_tokens=False)["input_ids"]
                for window in get_rolling_token_windows(ids, prefix_token_id(self.tok), self.max_length, 1):
                    owner.append(k)
                    pairs.append(make_disjoint_window(window))
            totals = [0.0] * len(requests)
            for k, (ll, _) in zip(owner, self._logprobs(pairs)):
                totals[k] += ll
            return totals

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy continuations (through the model's own `generate_new`), cut at the first stop string."""
            out = []
            was_training = self.model.training
            self.model.eval()
            try:
                for r in requests:
                    context, kwargs = r.args[0], dict(r.args[1] or {})
                    until = kwargs.get("until") or []
                    until = [until] if isinstance(until, str) else list(until)
                    ids = self.tok(context, add_special_tokens=False)["input_ids"] or [prefix_token_id(self.tok)]
                    budget = int(kwargs.get("max_gen_toks", 256))
                    ids = ids[-max(1, self.max_length - budget):]
                    x = torch.tensor([ids], device=self._device)
                    new = self.model.generate_new(x, torch.ones_like(x), budget, **self.model.media_inputs([{}], x),
                                                  pad_token_id=self.processor.pad_id,
                                                  eos_token_id=self.processor.eos_ids)
                    text = self.tok.decode(new[0].tolist(), skip_special_tokens=True)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out.append(text)
            finally:
                self.model.train(was_training)
            return out

    return MMCLLanguageModel


def language_model(model: MLLM, processor: Processor, *, batch_size: int, device: torch.device):
    """mmcl's model as an `lm_eval.api.model.LM` (for `lm_eval.simple_evaluate(model=...)`)."""
    _harness()
    return _model_class()(model, processor, batch_size, device, model_max_length(model))


def matrix_score(metrics: dict[str, Any], higher_is_better: dict[str, bool]) -> tuple[str, float]:
    """(metric, score 0-100 higher-is-better) of one task's lm-eval results (keys like "acc,none"); see the module
    docstring for the rule."""
    values = {k.split(",")[0]: v for k, v in metrics.items()
              if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name, better in higher_is_better.items():
        if better and name in values and math.isfinite(values[name]):
            v = float(values[name])
            return name, 100.0 * v if 0.0 <= v <= 1.0 else v
    for name in PERPLEXITIES:
        if name in values and values[name] > 0:
            return name, 100.0 / float(values[name])
    if "bits_per_byte" in values:
        return "bits_per_byte", 100.0 * 2.0 ** -float(values["bits_per_byte"])
    raise ValueError(f"lm-eval reported no metric mmcl can put on a 0-100 scale: {sorted(values)} (a higher-is-better "
                     f"metric, {', '.join(PERPLEXITIES)} or bits_per_byte)")


def _task_config(spec: str, name: str) -> tuple[Any, list[str] | None]:
    """What `simple_evaluate` gets for a task, and the folders lm-eval should index (None: its own tasks): a
    registered name as is; a local YAML file as a config dict with its relative data files made absolute, its folder
    indexed; a file lm-eval must read itself (`include:`, `!function` tags) by its task `name`, its folder indexed."""
    import yaml

    path = Path(spec)
    if not spec.endswith((".yaml", ".yml")):
        return spec, None
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError:  # lm-eval's own tags (!function): let its loader read the folder
        cfg = None
    if not isinstance(cfg, dict) or "include" in cfg:
        return name, [str(path.parent)]
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        cfg["dataset_kwargs"] = {**kwargs, "data_files": _absolute(kwargs["data_files"], path.parent)}
    return cfg, [str(path.parent)]


def _absolute(files: Any, folder: Path) -> Any:
    """`data_files` (a path, a list, or split -> path(s)) with relative local paths made absolute from `folder`."""
    if isinstance(files, dict):
        return {k: _absolute(v, folder) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(f, folder) for f in files]
    if isinstance(files, str) and not Path(files).is_absolute() and "://" not in files:
        return str(folder / files)
    return files


def evaluate_lm_eval_task(model: MLLM, processor: Processor, task: Task, *, batch_size: int, device: torch.device,
                          limit: int | None = None) -> TaskResult:
    """Run one `lm_eval:` column through lm-eval (0-shot, up to `limit` documents) and put its result on the
    matrix's scale; predictions hold every metric and each document's responses."""
    lm_eval = _harness()
    from lm_eval.tasks import TaskManager

    name = task.name.removeprefix("lm_eval-")
    config, include = _task_config(task.lm_eval_task or "", name)
    manager = TaskManager(include_path=include, include_defaults=include is None)
    lm = language_model(model, processor, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=lm, tasks=[config], task_manager=manager, limit=limit,
                                      bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    if name not in results["results"]:
        raise DataError(f"{task.manifest}: lm-eval returned no result for task {name!r} "
                        f"(got {sorted(results['results'])}); a group? name its tasks one by one")
    metric, score = matrix_score(results["results"][name], results.get("higher_is_better", {}).get(name, {}))
    summary = {k: v for k, v in results["results"][name].items() if isinstance(v, (int, float, str))}
    preds = [{"id": f"{name}:summary", "prompt": f"lm-eval task {name}", "prediction": f"{metric} -> {score:.4f}",
              "references": [], "score": score, "metrics": summary}]
    for s in results.get("samples", {}).get(name, []):
        args = s.get("arguments") or [[""]]
        value = s.get(metric)  # the column's metric for this document, when it is a per-document 0/1 score
        preds.append({"id": f"{name}:{s.get('doc_id')}", "prompt": str(args[0][0])[:500],
                      "prediction": str(s.get("filtered_resps"))[:500], "references": [str(s.get("target"))],
                      "score": 100.0 * value if isinstance(value, (int, float)) and 0 <= value <= 1 else None})
    return TaskResult(task.name, float(score), preds)
