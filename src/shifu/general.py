"""General ability kept: the user's lm-evaluation-harness tasks on the base and the merged student.

    pip install 'shifu[lm-eval]'
    eval: {lm_eval_tasks: [cmmlu, ceval-valid], lm_eval_limit: 200}

Both models run through lm-eval's HFLM wrapper on a model object shifu loaded itself (the device
and dtype rule of shifu.device), so lm-eval never downloads a model. Tasks come from lm-eval's own
catalogue (their datasets must be reachable or cached) or from `eval.lm_eval_include`, a folder of
YAML tasks. The change in each task's accuracy gets a paired bootstrap interval over its questions.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shifu.config import Config
from shifu.errors import UserError
from shifu.stats import paired_change

log = logging.getLogger("shifu")
METRICS = ("acc", "acc_norm", "exact_match")


def task_manager(include: str | None, tasks: list[str] = ()):
    """lm-eval's task index; only the user's folder when it holds every task asked for, since
    indexing lm-eval's own catalogue of thousands of YAML files takes a minute on a small CPU."""
    from lm_eval.tasks import TaskManager

    if include and not Path(include).is_dir():
        raise UserError(f"eval.lm_eval_include {include!r}: folder not found; point it at a folder of lm-eval YAML tasks")
    if include:
        own = TaskManager(include_path=include, include_defaults=False)
        if tasks and all(t in own.all_tasks for t in tasks):
            return own
    return TaskManager(include_path=include) if include else TaskManager()


def per_question(model, tok, tasks: list[str], manager, limit: int | None, batch_size: int) -> dict:
    """{task: {metric: [value per question, in doc order]}} for one model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True,
                          bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    out = {}
    for task, rows in res["samples"].items():
        rows = sorted(rows, key=lambda r: r["doc_id"])
        out[task] = {m: [float(r[m]) for r in rows] for m in METRICS if rows and m in rows[0]}
    return out


def compare(base: dict, trained: dict, boot: int, seed: int) -> dict:
    """Per task and metric: base -> merged student, with the paired interval and its verdict."""
    out = {}
    for task in sorted(base):
        out[task] = {m: paired_change(base[task][m], trained[task][m], samples=boot, seed=seed)
                     for m in base[task] if m in trained.get(task, {})}
    return out


def run_general(cfg: Config, load) -> dict:
    """`load(path)` -> (model, tokenizer) in the eval placement; base first, then the merged student."""
    e = cfg.eval
    if not e.lm_eval_tasks:
        return {}
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("eval.lm_eval_tasks is set but lm-eval is not installed; pip install 'shifu[lm-eval]'") from None
    if not (cfg.merged_dir / "config.json").exists():
        raise UserError(f"{cfg.merged_dir}: no merged model for eval.lm_eval_tasks; run `shifu merge` first")
    manager = task_manager(e.lm_eval_include, list(e.lm_eval_tasks))
    unknown = [t for t in e.lm_eval_tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"eval.lm_eval_tasks: unknown task(s) {', '.join(unknown)}; check the names with "
                        "`lm-eval ls tasks`, or add a folder of YAML tasks as eval.lm_eval_include")
    from shifu.evaluate import eval_batch_size

    scores = []
    for path in (cfg.model_name, str(cfg.merged_dir)):
        model, tok = load(path)
        batch = eval_batch_size(cfg, model.device)
        scores.append(per_question(model, tok, list(e.lm_eval_tasks), manager, e.lm_eval_limit, batch))
        del model
    return compare(scores[0], scores[1], e.bootstrap_samples, e.seed)
