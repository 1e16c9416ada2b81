"""The teach stage against the fault-injecting fake server: every fault ends with every record
stored, Retry-After and rate limits hold, fatal statuses stop at once, budgets hold, logprobs and
answer checks land where they should, a `kill -9` loses and re-buys nothing, and the API key is
written nowhere.

    .venv/bin/pytest tests/test_teach.py -q
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from shifu.errors import TeacherError, UserError
from shifu.fake_openai import FAULTS, FakeBackend, FakeServer
from shifu.files import read_jsonl
from shifu.logprobs import unpack_logprobs
from shifu.pipeline import run_stage
from shifu.store import Store
from shifu.tasks import answer_requests, questions_for, task_request
from shifu.teach import Runner
from shifu.teacher import make_client

ROOT = Path(__file__).resolve().parents[1]
RETRYABLE = ["429", "500", "502", "503", "504", "timeout", "reset", "truncated", "invalid", "blank_json", "empty"]
FLAGGED = {"length": "truncated", "refusal": "refusal"}
PRICES = {"fake-teacher": {"input_cache_hit": 100.0, "input_cache_miss": 200.0, "output": 400.0}}


# ---- helpers ------------------------------------------------------------------------------------

def small(make_config, url: str, **kw):
    """~5 chunks: 5 question proposals, 10 answers and 5 continuations; 16 requests in flight."""
    return make_config(url, **{"chunk_size": 600, "teacher__max_concurrency": 16, **kw})


def prepare(cfg) -> None:
    run_stage("chunk", cfg)
    run_stage("tasks", cfg)


def expected_requests(cfg) -> list:
    """Every request a complete run makes, the answer requests read from the stored questions."""
    reqs = []
    with Store(cfg.store_path) as store:
        for task in read_jsonl(cfg.tasks_path):
            if task["source"] != "teacher":
                continue
            reqs.append(task_request(task, cfg))
            if task["parse"] == "json_qa":
                questions, reason = questions_for(task, cfg, store.get)
                assert questions, f"{task['task_id']}: {reason}"
                reqs += [req for _, req in answer_requests(task, questions, cfg)]
    return reqs


def assert_all_stored(cfg) -> list:
    reqs = expected_requests(cfg)
    with Store(cfg.store_path) as store:
        missing = [r.key for r in reqs if store.get(r.key) is None]
        assert not missing, f"{len(missing)} of {len(reqs)} requests have no stored answer"
        assert store.totals()["stored_failed"] == 0
    return reqs


def server_key(cfg, req) -> str:
    """The fake server's key of a request: the hash of the JSON body the client posts."""
    return FakeBackend.key({"model": cfg.teacher.model, "messages": req.messages, **req.params})


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True), encoding="utf-8")
    return path


def shifu(*args, env: dict | None = None) -> subprocess.Popen:
    """`python -m shifu ...` as a real process, its output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.Popen([sys.executable, "-m", "shifu", *map(str, args)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def ok_keys(path: Path) -> set[str]:
    """Answer keys committed so far, read as another process would (WAL allows it mid-run)."""
    if not path.exists():
        return set()
    db = sqlite3.connect(str(path), timeout=5)
    try:
        return {k for (k,) in db.execute("SELECT key FROM answers WHERE status = 'ok'")}
    except sqlite3.OperationalError:  # the writer has not created the table yet
        return set()
    finally:
        db.close()


# ---- every fault class --------------------------------------------------------------------------

@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_class_ends_with_every_record_stored(fake_server, make_config, fault):
    server = fake_server(fault_first=1 if fault in ("timeout",) + tuple(FLAGGED) else 2, faults=[fault],
                         timeout_sleep=3)
    # A flagged answer is stored as it is; on a question proposal it would leave nothing to answer.
    cfg = small(make_config, server.url, teacher__timeout_s=0.3, teacher__max_attempts=4,
                **({"enable_qa": False} if fault in FLAGGED else {}))
    prepare(cfg)
    t0 = time.monotonic()
    stats = run_stage("teach", cfg)
    reqs = assert_all_stored(cfg)
    assert stats["complete"] and stats["failed"] == 0 and stats["done"] == stats["planned"] == len(reqs)
    if fault == "blank_json":  # only JSON-mode requests can come back blank
        assert stats["retry_reasons"] == {"blank content in JSON mode": 2 * cfg.enable_qa * 5}
    elif fault in RETRYABLE:
        assert stats["retried"] == sum(server.faults_sent.values()) == len(reqs) * server.fault_first
    elif fault in FLAGGED:
        assert stats["flags"] == {FLAGGED[fault]: len(reqs)} and stats["retried"] == 0
    else:  # keepalive: parsed through, nothing to retry
        assert stats["retried"] == 0 and stats["flags"] == {} and server.faults_sent[fault] == len(reqs)
    if fault == "timeout":  # two rounds (proposals, then answers) of one 0.3 s timeout each, not 3 s sleeps
        assert time.monotonic() - t0 < 2.5


def test_a_random_mix_of_every_fault_at_a_high_rate(fake_server, make_config):
    server = fake_server(fault_rate=0.5, seed=7, timeout_sleep=3)
    cfg = small(make_config, server.url, teacher__timeout_s=1.0, teacher__max_attempts=40)
    prepare(cfg)
    stats = run_stage("teach", cfg)
    answered = set(server.answered_by_key)
    assert len(server.faults_sent) >= 10 and stats["retried"] > 0
    for req in assert_all_stored(cfg):
        assert server_key(cfg, req) in answered
    dataset = run_stage("dataset", cfg)
    assert dataset["unanswered"] == 0 and not [k for k in dataset if k.startswith("unanswered:")]


def test_a_stored_answer_is_never_bought_again(fake_server, make_config):
    server = fake_server()
    cfg = small(make_config, server.url)
    prepare(cfg)
    first = run_stage("teach", cfg)
    sent = sum(server.requests_by_key.values())
    again = run_stage("teach", cfg, force=True)
    assert sum(server.requests_by_key.values()) == sent == first["planned"]
    assert again["cached"] == again["planned"] == first["planned"] and again["sent"] == 0


# ---- Retry-After and rate limits ----------------------------------------------------------------

def test_retry_after_is_honoured_beyond_the_backoff_cap(fake_server, make_config):
    server = fake_server(fault_first=1, faults=["429"], retry_after="1")
    cfg = small(make_config, server.url, enable_qa=False, teacher__backoff_max_s=0.05)
    prepare(cfg)
    run_stage("teach", cfg)
    times: dict[str, list[float]] = {}
    for t, key in server.arrivals:
        times.setdefault(key, []).append(t)
    assert len(times) == 5 and all(len(ts) == 2 for ts in times.values())
    gaps = [ts[1] - ts[0] for ts in times.values()]
    assert min(gaps) >= 1.0, gaps


def _span(server) -> float:
    return server.arrivals[-1][0] - server.arrivals[0][0]


def test_requests_per_minute_throttles(fake_server, make_config):
    server = fake_server()
    cfg = make_config(server.url, enable_qa=False, teacher__requests_per_minute=300)  # 5 a second
    prepare(cfg)
    run_stage("teach", cfg)
    n = len(server.arrivals)
    assert n == 10
    # The bucket starts with one second's worth (5); the other 5 come at 5 a second.
    assert _span(server) >= 0.9 * (n - 5) / 5
    for i, (t, _) in enumerate(server.arrivals):  # slack for a busy machine; unthrottled, all 10 come in ~0.1 s
        assert t - server.arrivals[0][0] >= (i + 1 - 5) / 5 - 0.15


def test_tokens_per_minute_throttles(fake_server, make_config):
    server = fake_server()
    cfg = make_config(server.url, enable_qa=False, teacher__tokens_per_minute=45600)  # 760 a second
    prepare(cfg)
    run_stage("teach", cfg)
    rate = 45600 / 60
    tc = cfg.teacher
    store = Store(cfg.work / "teacher.sqlite")
    est = credit = 0
    for req in expected_requests(cfg):
        e = req.est_prompt_tokens + int(tc.max_tokens * tc.expected_output_ratio)
        u = store.get(req.key)["usage"]
        est += e
        credit += max(0, e - u["prompt_tokens"] - u["completion_tokens"])  # refunds after each answer
    store.close()
    # Tokens spent = estimates; tokens available by T = first second's worth + rate * T + refunds.
    bound = (est - rate - credit) / rate
    assert bound > 0.5, "the limit must be tight enough to measure"
    assert _span(server) >= 0.9 * bound, (_span(server), bound)


# ---- fail fast, missing key, unreachable server -------------------------------------------------

HINTS = {400: "malformed", 401: "DEEPSEEK_API_KEY", 402: "top up", 403: "forbidden", 404: "teacher.model",
         422: "invalid parameters"}


def test_fatal_statuses_stop_at_once_through_the_cli(make_config, tmp_path):
    """One `shifu teach` process per status, all at once: two slow requests are answered and must be
    saved, every later one is refused at once; no retries, one line, no traceback."""
    runs = []
    servers = [FakeServer(lifetime=120, fatal_status=s, fatal_after=2, latency=0.6).__enter__() for s in HINTS]
    try:
        for status, server in zip(HINTS, servers):
            cfg = make_config(server.url, chunk_size=600, work_dir=str(tmp_path / f"w{status}"),
                              teacher__max_concurrency=4)
            prepare(cfg)
            runs.append((status, server, cfg, shifu("teach", write_config(cfg, tmp_path / f"{status}.yaml"))))
        for status, server, cfg, proc in runs:
            rc, out, err = finish(proc)
            lines = error_lines(err)
            assert rc == 3, (status, rc, err[-2000:])
            assert "Traceback" not in out + err
            assert len(lines) == 1 and f"HTTP {status}" in lines[0] and HINTS[status] in lines[0], err
            assert "rerun the same command" in lines[0]
            assert len(ok_keys(cfg.work / "teacher.sqlite")) == 2, "the two answers in flight were not saved"
            assert sum(server.requests_by_key.values()) <= cfg.teacher.max_concurrency  # no retry storm
            assert max(server.requests_by_key.values()) == 1
    finally:
        for server in servers:
            server.__exit__(None, None, None)


def test_missing_api_key_is_one_clear_line(make_config, tmp_path):
    cfg = make_config("https://api.deepseek.com", chunk_size=600)
    prepare(cfg)
    rc, out, err = finish(shifu("teach", write_config(cfg, tmp_path / "c.yaml"), env={"DEEPSEEK_API_KEY": None}))
    assert rc == 2 and "Traceback" not in out + err
    lines = error_lines(err)
    assert len(lines) == 1 and "DEEPSEEK_API_KEY is not set" in lines[0], err


def test_unreachable_base_url_fails_clearly_and_the_next_run_retries(make_config, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = small(make_config, f"http://127.0.0.1:{port}/v1", teacher__max_attempts=2)
    prepare(cfg)
    with pytest.raises(TeacherError, match=r"cannot reach the teacher: cannot connect .*teacher\.base_url") as info:
        run_stage("teach", cfg)
    assert "recorded as failed" in str(info.value) and "rerun the same command" in str(info.value)
    store = Store(cfg.work / "teacher.sqlite")
    failed = store.totals()["stored_failed"]
    reason = store.db.execute("SELECT error FROM answers WHERE status = 'failed'").fetchone()[0]
    store.close()
    assert failed == 10 and "cannot connect" in reason  # the five proposals and five continuations...
    server = FakeServer(lifetime=60)
    server.port = port  # ...are sent again once the server is there
    with server:
        stats = run_stage("teach", cfg)
    assert stats["complete"] and stats["done"] == stats["planned"] == 20
    assert_all_stored(cfg)


# ---- cost ---------------------------------------------------------------------------------------

def test_max_cost_stops_scheduling_before_the_budget_is_exceeded(fake_server, make_config):
    server = fake_server()
    cfg = make_config(server.url, enable_qa=False, teacher__prices=PRICES, teacher__peak_pricing=False,
                      teacher__max_cost=0.3)
    prepare(cfg)
    with pytest.raises(UserError, match=r"teacher.max_cost=0.3 reached with \d+ requests not sent; raise it"):
        run_stage("teach", cfg)  # an incomplete run fails, its figures still in the summary
    stats = json.loads(cfg.summary_path.read_text(encoding="utf-8"))["teach"]
    with Store(cfg.store_path) as store:
        spent = store.totals()["stored_cost"]
    assert stats["budget_stopped"] and not stats["complete"] and stats["partial"]
    assert 0 < stats["done"] < 10 and stats["unsent"] == 10 - stats["done"]
    assert spent <= 0.3 and stats["cost"] == pytest.approx(spent, abs=1e-6)
    # It stopped only when the next request's worst case no longer fit, not earlier.
    runner = Runner(cfg, None, Store(cfg.work / "teacher.sqlite"))
    unsent = [r for r in expected_requests(cfg) if runner.store.get(r.key) is None]
    assert spent + min(runner.budget.worst_cost(r) for r in unsent) > 0.3
    runner.store.close()
    # A bigger budget continues where it stopped, buying nothing twice.
    stats = run_stage("teach", cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"max_cost": 10.0})}))
    assert stats["complete"] and set(server.requests_by_key.values()) == {1}


def test_max_cost_without_a_price_is_refused_with_the_config(make_config):
    with pytest.raises(UserError, match="teacher.prices has no entry for teacher.model 'fake-teacher'"):
        small(make_config, "http://127.0.0.1:9/v1", teacher__max_cost=1.0)


def test_estimate_matches_the_run_it_predicts(fake_server, make_config):
    from shifu.estimate import teacher_estimate

    cfg = small(make_config, fake_server().url, teacher__prices=PRICES)
    est = teacher_estimate(cfg)
    assert est["tokens_counted_with"].startswith("student tokenizer")
    assert est["expected_cost_off_peak"] > 0 and est["max_cost_peak"] >= est["expected_cost_off_peak"]
    stats = run_stage("teach", cfg)
    assert est["requests"] == stats["planned"] == 20 and est["already_answered"] == 0 and stats["cost"] > 0
    # Once answered, nothing is left to pay; half answered, about half.
    after = teacher_estimate(cfg)
    assert after["requests"] == 0 and after["already_answered"] == 20 and after["expected_cost_off_peak"] == 0
    store = Store(cfg.work / "teacher.sqlite")
    answers = [r for r in expected_requests(cfg) if "response_format" not in r.params]
    store.db.executemany("DELETE FROM answers WHERE key = ?", [(r.key,) for r in answers[::2]])
    store.close()
    assert teacher_estimate(cfg)["requests"] == len(answers[::2])


# ---- logprobs and answer checks -----------------------------------------------------------------

def test_logprobs_are_stored_compactly_for_every_answer(fake_server, make_config):
    server = fake_server()
    cfg = small(make_config, server.url, teacher__top_logprobs=5)
    prepare(cfg)
    stats = run_stage("teach", cfg)
    assert stats["logprobs_missing"] == 0
    store = Store(cfg.work / "teacher.sqlite")
    answers = [r for r in expected_requests(cfg) if "top_logprobs" in r.params]
    assert len(answers) == 15  # the JSON question proposals ask for none
    for req in answers:
        stored = store.get(req.key)
        chosen, chosen_lp, cands, cand_lp = unpack_logprobs(stored["logprobs"])
        assert b"".join(chosen).decode() == stored["content"]
        assert cand_lp.shape == (len(chosen), 5) and (chosen_lp < 0).all()
        body = {"model": cfg.teacher.model, "messages": req.messages, **req.params}
        as_json = len(str(server.logprobs(body, stored["content"])).encode())
        assert len(stored["logprobs"]) * 3 < as_json
    store.close()


def test_a_server_without_logprobs_is_reported_once_and_the_run_goes_on(fake_server, make_config, caplog):
    server = fake_server(no_logprobs=True)
    cfg = small(make_config, server.url, teacher__top_logprobs=5)
    prepare(cfg)
    with caplog.at_level("WARNING", logger="shifu"):
        stats = run_stage("teach", cfg)
    warnings = [r for r in caplog.records if "returned no logprobs" in r.getMessage()]
    assert len(warnings) == 1
    assert stats["complete"] and stats["logprobs_missing"] == 15
    assert_all_stored(cfg)


def test_flagged_answers_are_counted_and_left_out_of_the_dataset(fake_server, make_config):
    server = fake_server(fault_rate=0.5, faults=["empty", "length", "refusal"], seed=3)
    cfg = make_config(server.url, teacher__max_attempts=8)
    prepare(cfg)
    stats = run_stage("teach", cfg)
    flagged = stats["flags"]
    # Blank answers are asked again, so they are stored as empty only when blank every time (see below).
    assert {"truncated", "refusal"} <= set(flagged) <= {"empty", "truncated", "refusal"}
    ds = run_stage("dataset", cfg)
    # Every flagged answer a dataset example would have used is rejected with its flag (a question
    # proposal refused or cut off twice leaves its chunk without questions).
    rejected = Counter(r["reason"] for r in read_jsonl(cfg.work / "rejected.jsonl"))
    assert {"empty", "truncated", "refusal"} & set(rejected)
    assert set(rejected) <= {"empty", "truncated", "refusal", "malformed_questions"}
    assert {k.split(":")[1]: v for k, v in ds.items() if k.startswith("rejected:")} == dict(rejected)
    store = Store(cfg.work / "teacher.sqlite")
    for ex in read_jsonl(cfg.work / "examples.jsonl"):
        if ex["key"]:
            assert store.get(ex["key"])["flags"] == []
    store.close()
    outputs = [ex["output"] for ex in read_jsonl(cfg.jsonl_output_path)]
    assert outputs and all(o.strip() and not o.startswith("抱歉") for o in outputs)


# ---- robustness ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_crashing_worker_ends_the_run_instead_of_hanging(fake_server, make_config, monkeypatch):
    cfg = small(make_config, fake_server().url)
    prepare(cfg)

    def full_disk(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Store, "put_ok_many", full_disk)
    tasks = list(read_jsonl(cfg.work / "tasks.jsonl"))

    async def go():
        store = Store(cfg.work / "teacher.sqlite")
        async with make_client(cfg.teacher) as client:
            runner = Runner(cfg, client, store)
            for task in tasks:
                runner.add(task_request(task, cfg))
            await runner.run()

    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        asyncio.run(go())


# ---- kill -9 and resume -------------------------------------------------------------------------

def test_kill_9_mid_run_then_rerun_loses_nothing_and_buys_nothing_twice(fake_server, make_config, tmp_path):
    server = fake_server(latency=0.15)
    cfg = small(make_config, server.url, teacher__max_concurrency=2)
    prepare(cfg)
    config = write_config(cfg, tmp_path / "teach.yaml")
    db = cfg.work / "teacher.sqlite"
    proc = shifu("teach", config)
    deadline = time.monotonic() + 60
    while len(ok_keys(db)) < 4:
        assert proc.poll() is None, f"teach ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "no answers stored within 60 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    stored_at_kill = ok_keys(db)
    sent_at_kill = Counter(server.requests_by_key)
    assert 4 <= len(stored_at_kill) < 20, "the kill must land mid-run"

    rc, out, err = finish(shifu("teach", config))
    assert rc == 0, err[-2000:]
    reqs = assert_all_stored(cfg)
    assert len(reqs) == 20
    by_key = {r.key: server_key(cfg, r) for r in reqs}
    for key in stored_at_kill:  # what was stored was not sent again
        assert server.requests_by_key[by_key[key]] == sent_at_kill[by_key[key]] == 1
    # Only the requests in flight at the kill can have been bought twice.
    assert sum(n > 1 for n in server.answered_by_key.values()) <= cfg.teacher.max_concurrency
    run_stage("dataset", cfg)
    examples = list(read_jsonl(cfg.work / "examples.jsonl"))
    keys = [e["key"] for e in examples]
    assert len(keys) == len(set(keys)) == 15  # 10 answers + 5 continuations, none twice
    rows = [(e["instruction"], e["input"], e["output"]) for e in examples]
    assert len(rows) == len(set(rows))


# ---- the API key is written nowhere -------------------------------------------------------------

def test_the_api_key_appears_in_no_file_and_no_log(fake_server, make_config, tmp_path):
    key = "sk-test-5h1fu-n0t-a-real-key-0123456789abcdef"
    server = fake_server(fault_rate=0.3, seed=1, timeout_sleep=2)
    cfg = small(make_config, server.url, teacher__timeout_s=0.5, teacher__max_attempts=30,
                teacher__extra_body={"note": "x"})
    config = write_config(cfg, tmp_path / "run.yaml")
    env = {"DEEPSEEK_API_KEY": key}
    logs = []
    for stage in ("chunk", "tasks", "teach", "dataset"):
        rc, out, err = finish(shifu(stage, config, "--verbose", env=env))
        assert rc == 0, err[-2000:]
        logs += [out, err]
    # A server that quotes the key back in its 401 body: the error line must still not carry it.
    refusing = fake_server(fatal_status=401, echo_key=True)
    cfg401 = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"base_url": refusing.url})})
    rc, out, err = finish(shifu("teach", write_config(cfg401, tmp_path / "run401.yaml"), "--verbose", env=env))
    assert rc == 3 and "HTTP 401" in err
    logs += [out, err]

    assert server.auth_headers and set(server.auth_headers) == {f"Bearer {key}"}  # the key was in use
    assert set(refusing.auth_headers) == {f"Bearer {key}"}
    assert sum(server.faults_sent.values()) > 0
    for text in logs:
        assert key not in text and key[8:] not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 8 and Path(cfg.jsonl_output_path).exists()
    for path in files:
        data = path.read_bytes()
        assert key.encode() not in data and key[8:].encode() not in data, f"the API key is in {path}"


# ---- the in-process teacher ---------------------------------------------------------------------

def test_a_local_teacher_answers_through_the_same_runner(make_config, tiny_teacher):
    cfg = make_config(chunk_size=600, enable_qa=False, teacher__kind="local", teacher__model=str(tiny_teacher),
                      teacher__max_tokens=6, teacher__top_logprobs=3, teacher__local_batch_size=3)
    prepare(cfg)
    stats = run_stage("teach", cfg)
    assert stats["complete"] and stats["done"] == stats["planned"] == 5 and stats["logprobs_missing"] == 0
    store = Store(cfg.work / "teacher.sqlite")
    for req in expected_requests(cfg):
        stored = store.get(req.key)
        chosen, chosen_lp, cands, cand_lp = unpack_logprobs(stored["logprobs"])
        assert 0 < len(chosen) <= 6 and cand_lp.shape == (len(chosen), 3)
        assert (cand_lp[:, 0] >= chosen_lp - 1e-4).all()  # the best alternative is at least the chosen token
        assert b"".join(chosen).decode("utf-8", "replace") == stored["content"]
    store.close()


# ---- one process per work_dir, full disks, partial runs, wrong servers, blank answers ------------

def wait_for(predicate, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_a_second_teach_on_the_same_work_dir_stops_at_once_and_nothing_is_bought_twice(make_config, tmp_path):
    with FakeServer(lifetime=120, latency=0.5) as server:
        cfg = small(make_config, server.url, teacher__max_concurrency=2)
        prepare(cfg)
        yaml_path = write_config(cfg, tmp_path / "c.yaml")
        first = shifu("teach", yaml_path)
        wait_for(lambda: server.received > 0)
        waiting = shifu("teach", yaml_path, "--wait")  # queues behind the first, then finds every answer stored
        rc, out, err = finish(shifu("teach", yaml_path))
        assert rc != 0 and "Traceback" not in out + err
        lines = error_lines(err)
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "--wait" in lines[0], err
        assert first.poll() is None  # it stopped at once, while the first still runs
        rc1, _, err1 = finish(first)
        rc3, _, err3 = finish(waiting)
        assert rc1 == 0 and rc3 == 0, err1[-2000:] + err3[-2000:]
        assert "waiting for" in err3
        assert set(server.requests_by_key.values()) == {1}  # one purchase per request, three processes


def test_a_lock_left_by_kill_9_never_blocks_and_ranks_of_one_launch_share_it(tmp_path, monkeypatch):
    from shifu.lock import work_dir_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom shifu.lock import work_dir_lock\n"
                               "with work_dir_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=rf"in use by pid {holder.pid} on .* since"):
        with work_dir_lock(tmp_path):
            pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with work_dir_lock(tmp_path):  # rank 1 of a launch whose rank 0 holds the lock
        pass
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with work_dir_lock(tmp_path), work_dir_lock(tmp_path):  # free again, and re-entrant
        pass


def test_a_full_disk_during_teach_is_one_line_and_every_committed_answer_is_kept(fake_server, make_config,
                                                                                  monkeypatch):
    server = fake_server()
    cfg = small(make_config, server.url, teacher__max_concurrency=1, teacher__top_logprobs=5)
    prepare(cfg)
    opened = Store.__init__

    def small_disk(self, path):
        opened(self, path)
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        self.db.execute(f"PRAGMA max_page_count = {pages + 3}")  # SQLite's own "database or disk is full"

    monkeypatch.setattr(Store, "__init__", small_disk)
    with pytest.raises(UserError) as info:
        run_stage("teach", cfg)
    message = str(info.value)
    assert str(cfg.store_path) in message and "full" in message and "free some space" in message, message
    assert "rollback" not in message and "\n" not in message
    monkeypatch.setattr(Store, "__init__", opened)
    kept = ok_keys(cfg.store_path)
    assert 0 < len(kept) < 20
    stats = run_stage("teach", cfg)  # space again: the rest is bought, the committed answers are not
    assert stats["complete"]
    by_key = {req.key: server_key(cfg, req) for req in expected_requests(cfg)}
    assert all(server.requests_by_key[by_key[k]] == 1 for k in kept)


def test_a_failed_request_makes_teach_fail_unless_a_partial_run_is_accepted(make_config, tmp_path):
    with FakeServer(lifetime=120, fault_rate=0.5, faults=["500"], seed=0) as server:
        cfg = small(make_config, server.url, enable_qa=False, teacher__max_attempts=1)
        prepare(cfg)
        yaml_path = write_config(cfg, tmp_path / "c.yaml")
        rc, out, err = finish(shifu("teach", yaml_path))
        lines = error_lines(err)
        assert rc != 0 and "Traceback" not in out + err and len(lines) == 1, err
        failed = json.loads(cfg.summary_path.read_text(encoding="utf-8"))["teach"]["failed"]
        assert 0 < failed < 5 and f"{failed} teacher requests failed" in lines[0] and "rerun to retry them" in lines[0]
        # The server now fails every request: accepting the partial run goes on with what is stored, and says so.
        server.backend.fault_rate = 1.0
        cfg2 = small(make_config, server.url, enable_qa=False, teacher__max_attempts=1, teacher__allow_partial=True)
        proc = subprocess.run([sys.executable, "-m", "shifu", "run", str(write_config(cfg2, tmp_path / "p.yaml")),
                               "--until", "dataset", "--skip-check"], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(cfg.summary_path.read_text(encoding="utf-8"))
    assert summary["teach"]["partial"] and summary["dataset"]["unanswered"] == failed
    assert "partial teacher run" in proc.stderr


def test_a_blank_plain_answer_is_asked_again_and_recorded_only_after_the_last_attempt(fake_server, make_config):
    server = fake_server(fault_first=1, faults=["empty"])
    cfg = small(make_config, server.url, enable_qa=False, teacher__max_attempts=3)
    prepare(cfg)
    stats = run_stage("teach", cfg)
    assert stats["complete"] and stats["flags"] == {} and stats["retry_reasons"] == {"blank content": 5}
    always = fake_server(fault_first=100, faults=["empty"])
    cfg2 = small(make_config, always.url, enable_qa=False, teacher__max_attempts=3, work_dir=str(cfg.work) + "2")
    prepare(cfg2)
    stats = run_stage("teach", cfg2)
    assert stats["complete"] and stats["flags"] == {"empty": 5} and set(always.requests_by_key.values()) == {3}


@pytest.mark.parametrize("wrong", [501, "html"])
def test_a_server_that_is_not_openai_compatible_stops_teach_at_once(fake_server, make_config, wrong):
    server = fake_server(wrong_api=wrong)
    cfg = small(make_config, server.url, teacher__max_concurrency=4)
    prepare(cfg)
    with pytest.raises(TeacherError, match=r"not an OpenAI-compatible server.*rerun the same command"):
        run_stage("teach", cfg)
    assert server.received <= cfg.teacher.max_concurrency  # stopped at once: no retries, nothing more sent
