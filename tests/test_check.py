"""`shifu check`: each problem a run would hit is one failed line with its fix, all of them in one
run, before anything is spent; warnings (no GPU) do not fail it; `shifu run` runs it first."""

import http.server
import json
import shutil
import threading
from collections import namedtuple

import pytest
from conftest import run_shifu, write_config

from shifu.check import check_file, failures, run_check


def by_status(results, status):
    return {r.name for r in results if r.status == status}


@pytest.fixture()
def http_server():
    """A stdlib server on 127.0.0.1 with the given handler class; stopped after the test."""
    servers = []

    def start(handler):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


class Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class NotOpenAI(Quiet):
    """Defines no do_GET / do_POST: http.server answers every request 501 Unsupported method."""


class ServesOtherModel(Quiet):
    """Lists one model and, as vLLM and OpenAI do, answers 404 to a chat request for any other."""

    def send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send(200, {"object": "list", "data": [{"id": "other-model", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})


@pytest.mark.parametrize("teacher", ["no_key", "closed_port"])
def test_every_problem_in_one_run_each_with_its_fix(teacher, make_config, tmp_path, monkeypatch):
    monkeypatch.delenv("SHIFU_TEST_NO_KEY", raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    url = "https://api.example.invalid/v1" if teacher == "no_key" else "http://127.0.0.1:9/v1"
    cfg = make_config(url, teacher__api_key_env="SHIFU_TEST_NO_KEY", model_name=str(tmp_path / "no-such-student"),
                      output_dir=str(blocker / "adapter"))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 1000, 1000))
    results = run_check(cfg)
    text = "\n".join(f"{r.detail} {r.fix}" for r in results)
    assert "no-such-student" in text and "a_file" in text and "1000 B free" in text
    assert all(r.fix for r in failures(results)) and "input" in by_status(results, "ok")
    if teacher == "no_key":
        assert by_status(results, "fail") == {"API key", "student", "folders", "disk"}, results
        assert "SHIFU_TEST_NO_KEY" in text
        assert by_status(results, "skip") == {"teacher"}  # no key: the teacher is not contacted
    else:  # a server on this machine needs no key
        assert by_status(results, "fail") == {"teacher", "student", "folders", "disk"}, results
        assert "cannot connect to http://127.0.0.1:9/v1" in text


@pytest.mark.parametrize("case", ["closed_port", "not_openai", "unknown_model", "no_logprobs"])
def test_each_teacher_problem(case, make_config, fake_server, http_server):
    if case == "closed_port":
        url, want = "http://127.0.0.1:9/v1", "cannot connect to http://127.0.0.1:9/v1"
    elif case == "not_openai":
        url, want = http_server(NotOpenAI), "not an OpenAI-compatible"
    elif case == "unknown_model":
        url, want = http_server(ServesOtherModel), "unknown to the server"
    else:
        url, want = fake_server(no_logprobs=True).url, "no logprobs"
    cfg = make_config(url, teacher__top_logprobs=5)
    bad = failures(run_check(cfg))
    assert len(bad) == 1 and want in bad[0].detail, bad
    assert bad[0].name == ("logprobs" if case == "no_logprobs" else "teacher")


def test_a_good_setup_passes_with_one_request_and_warns_about_the_cpu(make_config, fake_server, tiny_student):
    server = fake_server(tokenizer=str(tiny_student))
    results = run_check(make_config(server.url, teacher__top_logprobs=5))
    assert not failures(results), results
    assert {"input", "API key", "teacher", "logprobs", "student", "folders", "disk"} <= by_status(results, "ok")
    assert [r.detail for r in results if r.status == "warn"] == ["no GPU: training runs on CPU"]
    assert server.received == 1


def test_model_list_spares_the_request(make_config, http_server):
    url = http_server(ServesOtherModel)
    results = run_check(make_config(url, teacher__model="other-model"))
    assert not failures(results) and any("nothing spent" in r.detail for r in results), results


def test_local_teachers_are_loaded_not_called(make_config, tiny_teacher, tmp_path):
    cfg = make_config(teacher__kind="local", teacher__model=str(tiny_teacher),
                      distill__source="local", distill__local_teacher=str(tmp_path / "gone"))
    results = run_check(cfg)
    assert "teacher (local)" in by_status(results, "ok") and "API key" not in {r.name for r in results}
    assert [r.name for r in failures(results)] == ["white-box teacher"]


def test_offline_hub_name_and_cpu_qlora_fail_with_their_fix(make_config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = run_check(make_config(model_name="no-such-org/no-such-model", train__quantization="4bit"))
    student = [r for r in failures(results) if r.name == "student"]
    assert len(student) == 1 and "point model_name at the folder" in student[0].fix
    gpu = [r for r in failures(results) if r.name == "GPU"]
    assert gpu and any("4bit" in r.detail for r in gpu) or any("bitsandbytes" in r.detail for r in gpu)


def test_invalid_fields_are_failed_checks_and_the_rest_still_runs(make_config, tmp_path):
    path = write_config(make_config(), tmp_path / "c.yaml")
    path.write_text(path.read_text() + "batch_sise: 3\n", encoding="utf-8")
    results = check_file(str(path), ["teacher.max_concurrency=lots"])
    bad = [r.detail for r in failures(results)]
    assert any("batch_sise" in d for d in bad) and any("teacher.max_concurrency" in d for d in bad), bad
    assert "input" in by_status(results, "ok") and "student" in by_status(results, "ok")


def test_run_checks_first_and_stops_before_spending(make_config, tmp_path):
    cfg = make_config("http://127.0.0.1:9/v1")
    proc = run_shifu("run", write_config(cfg, tmp_path / "c.yaml"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--skip-check" in errors[0], proc.stderr[-2000:]
    assert "cannot connect to http://127.0.0.1:9/v1" in proc.stderr and "Traceback" not in proc.stderr
    assert not cfg.work.joinpath("chunks.jsonl").exists()


@pytest.mark.parametrize(("need", "free", "status"), [(30.0, 20, "fail"), (10.0, 5, "warn"), (10.0, 20, "ok")])
def test_gpu_memory_against_the_estimate(need, free, status, make_config, monkeypatch):
    """No GPU here: torch.cuda answers as a 24 GiB card would."""
    import torch

    import shifu.device
    from shifu.check import check_gpu

    gib = 1024 ** 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (free * gib, 24 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Fake 24G")
    monkeypatch.setattr(shifu.device, "local_device", lambda: torch.device("cuda", 0))
    results = check_gpu(make_config(), {"total": need})
    assert [r.status for r in results] == [status] and "Fake 24G" in results[0].detail, results
    if status == "fail":
        assert "train.quantization: 4bit" in results[0].fix


def test_api_distillation_without_logprobs_is_a_failure(make_config):
    from shifu.probe import check_distill

    assert [r.status for r in check_distill(make_config(distill__source="api"))] == ["fail"]
    assert check_distill(make_config(distill__source="api", teacher__top_logprobs=5)) == []


def test_the_command_lists_every_failure_then_one_error_line(make_config, tmp_path):
    path = write_config(make_config("http://127.0.0.1:9/v1"), tmp_path / "c.yaml")
    proc = run_shifu("check", path, "--set", "batch_size=0", "--set", f"model_name={tmp_path / 'nope'}")
    failed = [line for line in proc.stderr.splitlines() if line.startswith("✗")]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "3 check(s) failed" in errors[0], proc.stderr[-2000:]
    assert [line.split(":")[0] for line in failed] == ["✗ config", "✗ teacher", "✗ student"], failed
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("server_kw,status", [({"reasoning_field": "reasoning_content"}, "ok"),
                                              ({"reasoning_field": "reasoning", "refuse_logprobs": True}, "ok"),
                                              ({}, "fail")])
def test_thinking_mode_is_checked_with_room_to_think(server_kw, status, make_config, fake_server):
    server = fake_server(**server_kw)
    results = run_check(make_config(server.url, teacher__top_logprobs=5, teacher__thinking=True))
    thinking = [r for r in results if r.name == "thinking"]
    assert len(thinking) == 1 and thinking[0].status == status, results
    logprobs = [r for r in results if r.name == "logprobs"]
    if server_kw.get("refuse_logprobs"):
        assert logprobs[0].status == "warn" and "refuses logprobs" in logprobs[0].detail
    elif status == "ok":
        assert logprobs[0].status == "ok", logprobs
