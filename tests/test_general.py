"""General ability through lm-evaluation-harness, offline: a local multiple-choice task written for
the test (tests/data/lm_eval), run on a tiny model through the same code path as cmmlu or mmlu."""

import pytest
from conftest import ROOT

pytest.importorskip("lm_eval")

TASKS = str(ROOT / "tests" / "data" / "lm_eval")


@pytest.fixture()
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_local_task_runs_and_scores_every_question(in_repo, tiny_student):
    from shifu.general import per_question, task_manager
    from shifu.models import load_causal_lm, load_tokenizer

    manager = task_manager(TASKS, ["shifu_tiny_mc"])
    assert "shifu_tiny_mc" in manager.all_tasks
    model, tok = load_causal_lm(str(tiny_student)).eval(), load_tokenizer(str(tiny_student))
    scores = per_question(model, tok, ["shifu_tiny_mc"], manager, limit=None, batch_size=4)
    acc = scores["shifu_tiny_mc"]["acc"]
    assert len(acc) == 6 and set(acc) <= {0.0, 1.0}


def test_run_general_compares_base_and_merged_with_intervals(in_repo, tiny_student, tiny_teacher, make_config,
                                                              tmp_path):
    import shutil

    from shifu.general import run_general
    from shifu.models import load_causal_lm, load_tokenizer

    cfg = make_config(eval__lm_eval_tasks=["shifu_tiny_mc"], eval__lm_eval_include=TASKS, eval__lm_eval_limit=4)
    shutil.copytree(tiny_teacher, cfg.merged_dir)  # other weights stand in for the merged student
    loaded = []

    def load(path):
        loaded.append(path)
        return load_causal_lm(path).eval(), load_tokenizer(path)

    out = run_general(cfg, load)
    assert loaded == [cfg.model_name, str(cfg.merged_dir)]
    acc = out["shifu_tiny_mc"]["acc"]
    assert acc["n"] == 4 and acc["ci"] is not None and acc["verdict"] in ("better", "worse", "no measurable change")
    assert acc["change"] == pytest.approx(acc["after"] - acc["before"])


@pytest.mark.slow  # an unknown name is looked up in lm-eval's whole catalogue: a minute of indexing
def test_unknown_task_is_one_clear_line(in_repo, make_config, tiny_teacher):
    import shutil

    from shifu.errors import UserError
    from shifu.general import run_general

    cfg = make_config(eval__lm_eval_tasks=["no_such_task_xyz"], eval__lm_eval_include=TASKS)
    shutil.copytree(tiny_teacher, cfg.merged_dir)
    with pytest.raises(UserError, match="no_such_task_xyz"):
        run_general(cfg, lambda path: None)
