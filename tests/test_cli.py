"""End to end through the `shifu` command: every artifact of a run, skipping what is up to date,
and bad input answered with one line, a non-zero exit and nothing already produced lost."""

import json
from pathlib import Path

import pytest
from conftest import SAMPLE_EN, run_shifu, write_config
from safetensors import safe_open

FIELDS = {"instruction", "input", "output", "chunk_id", "category"}


def no_traceback(proc):
    return "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_shifu_run_produces_every_artifact(make_config, fake_server, tiny_student, tmp_path):
    server = fake_server(tokenizer=str(tiny_student))
    cfg = make_config(server.url, teacher__top_logprobs=5, train__max_steps=4, train__save_steps=2)
    yaml_path = write_config(cfg, tmp_path / "tiny.yaml")
    proc = run_shifu("run", yaml_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work, adapter, merged = cfg.work, tmp_path / "adapter", cfg.merged_dir
    for name in ("chunks.jsonl", "tasks.jsonl", "teacher.sqlite", "examples.jsonl", "rejected.jsonl",
                 "manifest.json", "summary.json", "config.yaml", "eval/report.json", "eval/samples.md"):
        assert (work / name).exists(), name
    rows = [json.loads(line) for line in open(cfg.jsonl_output_path, encoding="utf-8")]
    held = [json.loads(line) for line in open(cfg.eval_jsonl_path, encoding="utf-8")]
    assert rows and held
    assert all(set(r) == FIELDS and r["category"] in ("问答", "文章生成") for r in rows + held)
    assert not {r["chunk_id"] for r in rows} & {r["chunk_id"] for r in held}
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "shifu_config.yaml",
                 "train_summary.json", "loss_curve.png"):
        assert (adapter / name).exists(), name
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert any("lora_A" in k for k in f.keys())
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (merged / name).exists(), name
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary) == {"chunk", "tasks", "teach", "dataset", "train", "merge", "eval"}
    assert summary["train"]["kd_source"] == "api" and summary["train"]["kd_coverage"] > 0.9
    report = summary["eval"]
    assert report["before"]["loss"] > 0 and "top1_agreement" in report["after"]
    assert "run summary" in proc.stderr
    # the same command again: every stage is up to date and skipped
    again = run_shifu("run", yaml_path)
    assert again.returncode == 0 and again.stderr.count("up to date") == 7, again.stderr[-2000:]


def test_changing_a_setting_reruns_that_stage_and_later_ones(make_config, fake_server, tmp_path):
    from shifu.pipeline import run_all

    server = fake_server()
    cfg = make_config(server.url)
    run_all(cfg, until="dataset")
    before = server.requests_by_key.copy()
    cfg2 = make_config(server.url, eval__eval_ratio=0.4)
    res = run_all(cfg2, until="dataset")
    assert res["chunk"].get("skipped") and res["teach"].get("skipped")
    assert not res["dataset"].get("skipped")
    assert server.requests_by_key == before  # nothing was bought again


@pytest.mark.parametrize("case", ["missing_data", "empty_data", "unknown_key", "wrong_type", "missing_key",
                                  "bad_override"])
def test_bad_input_is_one_clear_line(case, make_config, tmp_path):
    cfg = make_config()
    tree_path = write_config(cfg, tmp_path / "c.yaml")
    text = tree_path.read_text(encoding="utf-8")
    args, env = ["chunk", tree_path], {}
    if case == "missing_data":
        args += ["--set", f"raw_data_path={tmp_path / 'nope.txt'}"]
        want = "raw_data_path"
    elif case == "empty_data":
        (tmp_path / "empty.txt").write_text("", encoding="utf-8")
        args += ["--set", f"raw_data_path={tmp_path / 'empty.txt'}"]
        want = "no text found"
    elif case == "unknown_key":
        tree_path.write_text(text + "\nbatch_sise: 3\n", encoding="utf-8")
        want = "unknown key 'batch_sise'"
    elif case == "wrong_type":
        args += ["--set", "teacher.max_concurrency=lots"]
        want = "teacher.max_concurrency"
    elif case == "bad_override":
        args += ["--set", "teacher.max_concurrency"]
        want = "KEY=VALUE"
    else:
        run_shifu("chunk", tree_path)
        run_shifu("tasks", tree_path)
        args = ["teach", tree_path, "--set", "teacher.base_url=https://api.example.invalid"]
        env = {"DEEPSEEK_API_KEY": ""}
        want = "DEEPSEEK_API_KEY is not set"
    proc = run_shifu(*args, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip().startswith("error:")]
    assert proc.returncode != 0 and len(lines) == 1 and want in proc.stderr, proc.stderr[-2000:]
    assert no_traceback(proc)
    if case == "missing_key":
        assert (cfg.work / "chunks.jsonl").exists() and (cfg.work / "tasks.jsonl").exists()


def test_unreachable_teacher_fails_clearly_and_keeps_earlier_outputs(make_config, tmp_path):
    cfg = make_config("http://127.0.0.1:9/v1", teacher__max_attempts=2, raw_data_path=str(SAMPLE_EN))
    yaml_path = write_config(cfg, tmp_path / "c.yaml")
    proc = run_shifu("run", yaml_path, "--skip-check")  # past the preflight check, which would stop it first
    assert proc.returncode != 0 and no_traceback(proc)
    assert "127.0.0.1:9" in proc.stderr and "error:" in proc.stderr
    assert (cfg.work / "chunks.jsonl").exists() and (cfg.work / "tasks.jsonl").exists()


@pytest.mark.parametrize("stage,first", [("tasks", "chunk"), ("teach", "tasks"), ("dataset", "teach")])
def test_a_stage_before_the_one_it_reads_from_says_which_command_comes_first(stage, first, make_config):
    from shifu.errors import UserError
    from shifu.pipeline import ORDER, run_stage

    cfg = make_config()
    for earlier in ORDER[:ORDER.index(first)]:
        run_stage(earlier, cfg)
    with pytest.raises(UserError, match=rf"does not exist yet: run `shifu {first} CONFIG` first"):
        run_stage(stage, cfg)


def test_a_missing_stage_input_through_the_cli_is_one_line(make_config, tmp_path):
    proc = run_shifu("teach", write_config(make_config(), tmp_path / "c.yaml"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and no_traceback(proc) and len(lines) == 1 and "shifu tasks" in lines[0]


def test_token_chunks_with_a_missing_model_give_the_missing_model_line(make_config, tmp_path):
    from shifu.errors import UserError
    from shifu.pipeline import run_stage

    cfg = make_config(model_name=str(tmp_path / "no-such-model"), data__chunk_unit="tokens")
    with pytest.raises(UserError, match=r"no-such-model'?: folder not found"):
        run_stage("chunk", cfg)


def unwritable(tmp_path):
    """A folder this process cannot write: read-only by mode, or, for root (whom modes do not stop),
    one inside /sys, where nothing can be created."""
    import os

    if os.geteuid() == 0:
        return Path("/sys/shifu-test-readonly")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("field", ["work_dir", "output_dir", "jsonl_output_path"])
def test_an_unwritable_output_folder_is_one_line_before_anything_runs(field, make_config, tmp_path):
    bad = unwritable(tmp_path)
    value = str(bad / "data.jsonl") if field == "jsonl_output_path" else str(bad / "out")
    cfg = make_config(**{field: value})
    proc = run_shifu("run", write_config(cfg, tmp_path / "c.yaml"), "--skip-check")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and no_traceback(proc) and len(lines) == 1, proc.stderr[-2000:]
    assert field in lines[0] and str(bad) in lines[0] and "cannot write" in lines[0]
    assert not (tmp_path / "work" / "chunks.jsonl").exists()  # found before the first stage, not after training


def test_every_config_error_is_its_own_line(make_config, tmp_path):
    path = write_config(make_config(), tmp_path / "c.yaml")
    proc = run_shifu("chunk", path, "--set", "batch_size=0", "--set", "teacher.max_concurrency=lots",
                     "--set", "chunk_size=20", "--set", "data.chunk_overlap=30")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and no_traceback(proc)
    assert len(lines) == 2 and "batch_size" in lines[0] and "teacher.max_concurrency" in lines[1], proc.stderr
