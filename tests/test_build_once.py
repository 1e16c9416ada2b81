"""Artifacts every rank of a launch needs (teacher targets, the tokenized cache) are built by one
process while the others wait, and a finished folder is never missing while it is replaced."""

import json
import subprocess
import sys
import textwrap

from conftest import ROOT, write_config

from shifu.files import atomic_dir, build_lock

READER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    index, stop = Path(sys.argv[1]) / "index.json", Path(sys.argv[2])
    reads = fails = 0
    while not stop.exists():
        try:
            json.loads(index.read_text())
        except (OSError, ValueError):
            fails += 1
        reads += 1
    print(json.dumps({"reads": reads, "fails": fails}))
""")


def test_a_replaced_folder_is_never_missing_for_a_reader(tmp_path):
    target, stop = tmp_path / "kd" / "api-1", tmp_path / "stop"
    with atomic_dir(target) as tmp:
        (tmp / "index.json").write_text(json.dumps({"n": 0}))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        for i in range(300):
            with atomic_dir(target) as tmp:
                (tmp / "index.json").write_text(json.dumps({"n": i}))
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    seen = json.loads(out)
    assert seen["reads"] > 0 and seen["fails"] == 0, seen
    assert json.loads((target / "index.json").read_text()) == {"n": 299}
    assert [p.name for p in target.parent.iterdir()] == ["api-1"]  # no temporary or old folder left


def test_a_failed_build_leaves_the_finished_folder_as_it_was(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    try:
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("killed mid-build")
    except RuntimeError:
        pass
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_build_lock_excludes_another_process_until_released(tmp_path):
    target = tmp_path / "cache" / "x.npz"
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except BlockingIOError:\n    print('held')")
    lock_file = target.with_name(".x.npz.lock")

    def other_sees() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(lock_file)], capture_output=True, text=True).stdout.strip()

    with build_lock(target):
        assert other_sees() == "held"
    assert other_sees() == "free"


# Two processes released at the same instant run the lazy builds of `shifu train` (tokenized cache,
# then teacher targets); each build is slowed down, so without the lock both would build.
RANK = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import shifu.encode, shifu.targets
    from shifu.config import load_config
    from shifu.files import read_jsonl
    from shifu.models import load_tokenizer
    log, go = Path(sys.argv[2]), Path(sys.argv[3])

    def slowed(fn, name):
        def run(*args, **kwargs):
            with open(log, "a") as f:
                f.write(name + " " + str(os.getpid()) + "\\n")
            time.sleep(0.5)
            return fn(*args, **kwargs)
        return run

    shifu.encode._encode = slowed(shifu.encode._encode, "encode")
    shifu.targets._build = slowed(shifu.targets._build, "targets")
    cfg = load_config(sys.argv[1])
    train = list(read_jsonl(cfg.jsonl_output_path))
    tok = load_tokenizer(cfg.model_name)
    while not go.exists():
        time.sleep(0.001)
    enc = shifu.encode.encode_examples(tok, train, cfg.max_length, None, cfg.work / "cache")
    targets, info = shifu.targets.build_targets(cfg, tok, train, enc)
    print(info["kd_examples"], sum(len(x) for x in enc.input_ids))
""")


def test_two_ranks_build_the_cache_and_the_teacher_targets_once(make_config, fake_server, tiny_student, tmp_path):
    from shifu.pipeline import run_all

    server = fake_server(tokenizer=str(tiny_student))
    cfg = make_config(server.url, teacher__top_logprobs=5)
    run_all(cfg, until="dataset")
    yaml, log, go = write_config(cfg, tmp_path / "c.yaml"), tmp_path / "builds.log", tmp_path / "go"
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(yaml), str(log), str(go)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    outs = [r.communicate(timeout=120) for r in ranks]
    assert all(r.returncode == 0 for r in ranks), [err[-2000:] for _, err in outs]
    builds = log.read_text().split()
    assert builds[0::2] == ["encode", "targets"], builds  # one build of each, by one process
    assert outs[0][0] == outs[1][0] and int(outs[0][0].split()[0]) > 0  # both read the same, complete targets
