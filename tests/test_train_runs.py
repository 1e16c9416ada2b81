"""Training as users run it: a real `shifu train` subprocess killed with SIGKILL and resumed, and
two CPU processes (gloo) against one with the same global batch."""

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_shifu, write_config
from shifu.pipeline import run_all


@pytest.fixture()
def prepared(make_config, fake_server, tiny_student, tmp_path):
    """Data through the dataset stage, with stored logprobs, once; each test copies the work dir."""
    server = fake_server(tokenizer=str(tiny_student))
    cfg = make_config(server.url, teacher__top_logprobs=5, train__logging_steps=5)
    run_all(cfg, until="dataset")
    return cfg


def variant(cfg, tmp_path, name, **train):
    work = tmp_path / f"work-{name}"
    shutil.copytree(cfg.work, work)
    tree = cfg.model_dump(mode="json")
    tree.update(work_dir=str(work), output_dir=str(tmp_path / f"adapter-{name}"))
    tree["train"].update(train)
    for key in ("batch_size",):
        if key in train:
            tree[key] = tree["train"].pop(key)
    from shifu.config import config_from_dict

    new = config_from_dict(tree)
    return new, write_config(new, tmp_path / f"{name}.yaml")


def adapter(cfg):
    return load_file(f"{cfg.output_dir}/adapter_model.safetensors")


def assert_same(a, b, tol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a)
    assert worst < tol, f"adapters differ: worst relative difference {worst:.3g}"


def test_sigkill_during_training_then_rerun_resumes_and_matches(prepared, tmp_path):
    ref, ref_yaml = variant(prepared, tmp_path, "ref", max_steps=60, save_steps=10)
    cut, cut_yaml = variant(prepared, tmp_path, "cut", max_steps=60, save_steps=10)
    assert run_shifu("train", ref_yaml).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "shifu", "train", str(cut_yaml)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = cut.work / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert not (cut.output_dir and (tmp_path / "adapter-cut" / "adapter_model.safetensors").exists())
    again = run_shifu("train", cut_yaml)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    assert_same(adapter(ref), adapter(cut), 1e-4)


def test_two_processes_match_one_with_the_same_global_batch(prepared, tmp_path):
    one, one_yaml = variant(prepared, tmp_path, "one", max_steps=4, batch_size=4)
    two, two_yaml = variant(prepared, tmp_path, "two", max_steps=4, batch_size=2)
    assert run_shifu("train", one_yaml).returncode == 0
    env = {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    import os

    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", "29533", "-m", "shifu", "train", str(two_yaml)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same(adapter(one), adapter(two), 1e-4)
    assert not torch.equal(adapter(one)[next(iter(adapter(one)))], torch.zeros(1))
