"""The lm-evaluation-harness bridge: run its tasks on a loaded model through its HF wrapper.

Needs the optional extra ``lm-eval`` (``pip install 'onecomp[lm-eval]'``). Tasks are lm-eval task
names, or tasks defined by YAML files under ``include_path`` (local data, no download).
"""

from __future__ import annotations

import contextlib
import importlib.util

from ..errors import OneCompError


def run_tasks(model, tokenizer, tasks: list[str], *, include_path=None, batch_size: int = 1,
              limit: int | None = None, num_fewshot: int | None = None, seed: int = 0) -> dict:
    """lm-eval's results for ``tasks``: ``{"results": {task: {metric: value}}, "versions": ..., ...}``."""
    if importlib.util.find_spec("lm_eval") is None:
        raise OneCompError("onecomp eval --tasks needs lm-evaluation-harness: pip install 'onecomp[lm-eval]'")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_path] if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise OneCompError(f"lm-eval does not know the task(s) {', '.join(unknown)}; name installed lm-eval tasks, "
                           "or pass --include-path DIR holding their YAML definitions")
    device = str(next(model.parameters()).device)
    with _without_guard(model.config):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    return {"results": out["results"], "versions": out.get("versions", {}), "n-samples": out.get("n-samples", {})}


@contextlib.contextmanager
def _without_guard(config):
    """A loaded checkpoint's config keeps the ``quantization_config`` that stops plain transformers
    from reading the files (see onecomp/checkpoint/hf_config.py); lm-eval parses it as a transformers
    quantization config, so it is set aside while the harness runs on the already loaded model."""
    qc = getattr(config, "quantization_config", None)
    guard = isinstance(qc, dict) and "onecomp" in qc
    if guard:
        del config.quantization_config
    try:
        yield
    finally:
        if guard:
            config.quantization_config = qc


def plain_results(results: dict) -> dict:
    """``{task: {metric: value}}`` without lm-eval's alias entries and stderr placeholders."""
    return {task: {k: v for k, v in row.items() if k != "alias" and v != "N/A"}
            for task, row in results["results"].items()}
