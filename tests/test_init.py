"""`shifu init`: flags -> a commented config that validates, passes `shifu check` against the fake
server, never holds a key, fits the GPU memory given, and never overwrites a file unasked."""

import pytest
import yaml
from conftest import SAMPLE_ZH, run_shifu

from shifu.config import load_config
from shifu.errors import UserError
from shifu.init import build_tree, run_init


def test_flags_give_a_config_that_passes_check(fake_server, tiny_student, tmp_path):
    server = fake_server()
    out = tmp_path / "mine.yaml"
    proc = run_shifu("init", "--teacher", "openai", "--base-url", server.url, "--teacher-model", "fake-teacher",
                     "--student", tiny_student, "--data", SAMPLE_ZH, "--gpu-memory", "24", "--out", out,
                     env={"OPENAI_API_KEY": "sk-never-in-the-file"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text(encoding="utf-8")
    assert "sk-never-in-the-file" not in text and "api_key_env: OPENAI_API_KEY" in text
    assert "# Student: a Hugging Face causal LM folder" in text  # each field carries its description
    cfg = load_config(out)
    assert cfg.teacher.base_url == server.url and cfg.model_name == str(tiny_student)
    assert cfg.teacher.top_logprobs > 0 and cfg.teacher.extra_body == {} and cfg.train.quantization == "none"
    check = run_shifu("check", out)
    assert check.returncode == 0 and "error" not in check.stderr, check.stderr[-3000:]
    assert "✓ teacher" in check.stderr and "✓ student" in check.stderr and "! GPU" in check.stderr
    assert server.received == 1


def test_an_existing_file_is_kept_unless_forced(tiny_student, tmp_path):
    out = tmp_path / "c.yaml"
    out.write_text("mine\n", encoding="utf-8")
    with pytest.raises(UserError, match="--force"):
        run_init(str(out), teacher="deepseek", student=str(tiny_student), gpu_memory=0)
    assert out.read_text() == "mine\n"
    run_init(str(out), teacher="deepseek", student=str(tiny_student), gpu_memory=0, force=True)
    cfg = load_config(out)
    assert cfg.teacher.api_key_env == "DEEPSEEK_API_KEY" and cfg.teacher.base_url == "https://api.deepseek.com"
    assert cfg.teacher.max_cost is not None  # the shipped budget stays: DeepSeek's prices are known


def test_gpu_memory_picks_qlora_for_a_7b_student_under_24gb():
    def pick(student, gb):
        tree, why = build_tree("deepseek", None, None, student, "data.txt", gb)
        return tree["train"]["quantization"], tree["batch_size"], why

    assert pick("Qwen/Qwen2.5-7B-Instruct", 24)[0] == "4bit"
    assert pick("Qwen/Qwen2.5-7B-Instruct", 80)[0] == "none"
    assert pick("Qwen/Qwen2.5-72B-Instruct", 24)[2].startswith("even 4-bit QLoRA")
    quant, _, why = pick("Qwen/Qwen2.5-7B-Instruct", None)
    assert quant == "none" and "CPU" in why


def test_teachers(tiny_teacher, tmp_path):
    with pytest.raises(UserError, match="--teacher-model"):
        build_tree("local", None, None, "student", "data.txt", None)
    with pytest.raises(UserError, match="choose deepseek, openai or local"):
        build_tree("claude", None, None, "student", "data.txt", None)
    tree, _ = build_tree("local", None, str(tiny_teacher), "student", "data.txt", None)
    assert tree["teacher"]["kind"] == "local" and "base_url" not in tree["teacher"]
    tree, _ = build_tree("openai", "http://h:8000/v1", "m", "student", "data.txt", None)
    assert "max_cost" not in tree["teacher"]  # no price for a served model: a budget could not be counted
    assert yaml.safe_load(yaml.safe_dump(tree)) == tree


def test_a_terminal_is_asked_only_for_what_the_flags_left_out(tiny_student, tmp_path, monkeypatch):
    import sys

    import typer

    asked = []
    answers = {"Teacher": "openai", "Teacher server": "http://127.0.0.1:8000/v1", "Teacher model": "served-name",
               "Your text": "corpus/", "GPU memory": 0.0}

    def prompt(text, default=None, type=None):
        asked.append(text)
        return answers[max((k for k in answers if text.startswith(k)), key=len)]

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(typer, "prompt", prompt)
    path, _ = run_init(str(tmp_path / "c.yaml"), student=str(tiny_student))
    cfg = load_config(path)
    assert cfg.teacher.model == "served-name" and cfg.raw_data_path == "corpus/" and cfg.model_name == str(tiny_student)
    assert len(asked) == 5 and not any(q.startswith("Student") for q in asked)
