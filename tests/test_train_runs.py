"""Training as users run it: a real `shifu train` subprocess killed with SIGKILL and resumed, and
two CPU processes (gloo) against one with the same global batch."""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, write_config
from safetensors.torch import load_file
from transformers import Trainer

from shifu.pipeline import run_all
from shifu.train import run_train


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread here and in every subprocess: the reference and the resumed runs then do the
    same arithmetic, and on a busy machine a tiny model's steps run 5x faster than with spinning threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def prepared(make_config, fake_server, tiny_student, tmp_path):
    """Data through the dataset stage, with stored logprobs, once; each test copies the work dir."""
    server = fake_server(tokenizer=str(tiny_student))
    cfg = make_config(server.url, teacher__top_logprobs=5, train__logging_steps=5)
    run_all(cfg, until="dataset")
    return cfg


def variant(cfg, tmp_path, name, **overrides):
    """A copy of the prepared run in its own work dir; overrides as in make_config (lora__dropout=0.1)."""
    work = tmp_path / f"work-{name}"
    shutil.copytree(cfg.work, work)
    tree = cfg.model_dump(mode="json")
    tree.update(work_dir=str(work), output_dir=str(tmp_path / f"adapter-{name}"))
    for dotted, value in overrides.items():
        *sections, key = dotted.split("__")
        node = tree
        for section in sections:
            node = node[section]
        node[key] = value
    from shifu.config import config_from_dict

    new = config_from_dict(tree)
    return new, write_config(new, tmp_path / f"{name}.yaml")


def adapter(cfg):
    return load_file(f"{cfg.output_dir}/adapter_model.safetensors")


def assert_same(a, b, tol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a)
    assert worst < tol, f"adapters differ: worst relative difference {worst:.3g}"


# `shifu train` that SIGKILLs itself the moment checkpoint N is complete: a real kill -9 of a real
# process, at a step chosen by the test rather than by a race with a polling loop.
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from transformers import Trainer
stop = int(sys.argv.pop(1))
save = Trainer._save_checkpoint
def save_then_die(self, *args, **kwargs):
    save(self, *args, **kwargs)
    if self.state.global_step == stop:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer._save_checkpoint = save_then_die
from shifu.cli import main
sys.argv[0] = "shifu"
main()
"""


def train_killed_after(checkpoint: int, yaml) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(checkpoint), "train", str(yaml)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def updates_per_epoch(cfg, accumulation: int) -> int:
    n = len(Path(cfg.jsonl_output_path).read_text(encoding="utf-8").splitlines())
    return math.ceil(math.ceil(n / cfg.batch_size) / accumulation)


# dropout on, accumulation 2, held-out evaluation at each epoch's end
RESUMABLE = dict(num_epochs=3, lora__dropout=0.1, train__gradient_accumulation_steps=2, train__save_total_limit=2)


def test_killed_at_any_moment_the_resumed_run_matches_an_uninterrupted_one(prepared, tmp_path):
    """kill -9 mid-epoch 1, at the end of epoch 1 (whose held-out evaluation the resumed run never
    replays), and mid-epoch 3, resuming each time; length-grouped batches, the order used on CPU."""
    per_epoch = updates_per_epoch(prepared, 2)
    assert per_epoch >= 2
    stops = (per_epoch // 2, per_epoch, 2 * per_epoch + per_epoch // 2)
    every = math.gcd(*stops)  # a checkpoint at each stop, and no more of them than that needs
    ref, _ = variant(prepared, tmp_path, "ref", train__packing=False, train__save_steps=every, **RESUMABLE)
    cut, cut_yaml = variant(prepared, tmp_path, "cut", train__packing=False, train__save_steps=every, **RESUMABLE)
    assert ref.eval_jsonl_path.read_text(encoding="utf-8").strip(), "no held-out examples to evaluate"
    run_train(ref)  # uninterrupted, in this process: it has paid for the imports already
    resumed_from = None
    for stop in stops:
        killed = train_killed_after(stop, cut_yaml)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        if resumed_from:
            assert "resuming from" in killed.stderr and f"checkpoint-{resumed_from}" in killed.stderr
        resumed_from = stop
        assert not (Path(cut.output_dir) / "adapter_model.safetensors").exists()
    assert run_train(cut)["resumed_from"].endswith(f"checkpoint-{resumed_from}")
    assert_same(adapter(ref), adapter(cut), 1e-5)


class Crash(Exception):
    pass


def test_a_packed_run_crashed_after_an_evaluated_epoch_resumes_exactly(prepared, tmp_path, monkeypatch):
    """Packed batches (random order), stopped mid-epoch 2 by an exception and resumed in the same
    process, whose global random state is then nothing like a fresh process's."""
    stop = updates_per_epoch(prepared, 2) * 3 // 2
    ref, _ = variant(prepared, tmp_path, "ref", train__packing=True, train__save_steps=stop, **RESUMABLE)
    cut, _ = variant(prepared, tmp_path, "cut", train__packing=True, train__save_steps=stop, **RESUMABLE)
    run_train(ref)
    save = Trainer._save_checkpoint

    def save_then_crash(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.state.global_step == stop:
            raise Crash

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run_train(cut)
    monkeypatch.undo()
    torch.rand(1000)  # draws an uninterrupted run never made
    assert run_train(cut)["resumed_from"].endswith(f"checkpoint-{stop}")
    assert_same(adapter(ref), adapter(cut), 1e-5)


LAUNCH = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", "29533"],
    # the shipped config as the README gives it, on CPU processes: no --cpu, no precision override
    "accelerate-ddp": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                       "--main_process_port", "29534"],
}


@pytest.mark.parametrize("launcher", LAUNCH)
def test_two_processes_match_one_with_the_same_global_batch(prepared, tmp_path, launcher):
    one, _ = variant(prepared, tmp_path, "one", train__max_steps=4, batch_size=4)
    two, two_yaml = variant(prepared, tmp_path, "two", train__max_steps=4, batch_size=2)
    run_train(one)
    res = subprocess.run([*LAUNCH[launcher], "-m", "shifu", "train", str(two_yaml)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same(adapter(one), adapter(two), 1e-4)
    held = dict(re.findall(r"rank (\d+) holds (\d+) parameter bytes", res.stderr))
    assert held.keys() == {"0", "1"} and held["0"] == held["1"]  # DDP: every rank holds the whole model
    # trained: peft starts every lora_B at zero, so a nonzero lora_B means the steps moved the adapter
    trained = {k: v for k, v in adapter(one).items() if "lora_B" in k}
    assert trained and all(v.abs().max() > 0 for v in trained.values())


def test_fsdp_on_cpu_processes_stops_instead_of_running_ddp(prepared, tmp_path):
    """accelerate runs CPU processes as DDP whatever the config says; shifu says so and stops."""
    cfg, yaml = variant(prepared, tmp_path, "fsdp", train__max_steps=1)
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
                          "--main_process_port", "29535", "-m", "shifu", "train", str(yaml)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    # one line from shifu (the launcher adds its own traceback about a failed child)
    assert "error: the accelerate config asks for FSDP" in res.stderr, res.stderr[-3000:]
    assert 'shifu/train.py"' not in res.stderr
    assert not (Path(cfg.output_dir) / "adapter_model.safetensors").exists()


def test_check_launch_names_what_the_launcher_asked_for(monkeypatch):
    from types import SimpleNamespace

    from shifu.errors import UserError
    from shifu.train import check_launch

    ddp = SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False)
    check_launch(ddp)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DeepSpeed"):
        check_launch(ddp)
    check_launch(SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=True))
