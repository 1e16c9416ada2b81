"""The model card from a run's summary, and `shifu push` with huggingface_hub mocked at its boundary."""

from __future__ import annotations

import pytest

from shifu.card import base_license, card_text, run_push, write_card
from shifu.errors import UserError
from shifu.files import write_json

SUMMARY = {
    "chunk": {"chunks": 4}, "tasks": {"tasks": 12},
    "teach": {"done": 8, "completion_tokens": 512, "cost": 0.0},
    "dataset": {"train_examples": 10, "eval_examples": 2},
    "train": {"steps": 6, "train_loss": 1.2345, "kd_source": "api"},
    "eval": {"held_out_examples": 2,
             "changes": {"loss": {"before": 1.0336, "after": 0.9123, "n": 2, "change": -0.1213,
                                  "ci": [-0.2, -0.05], "verdict": "better"},
                         "top1_agreement": {"before": 0.5, "after": 0.55, "n": 2, "change": 0.05,
                                            "ci": None, "verdict": "no measurable change"}},
             "judge": {"trained_vs_base": {"win_rate": 0.6, "win_ci": [0.4, 0.8], "tie_rate": 0.1, "tie_ci": [0, 0.2],
                                           "loss_rate": 0.3, "loss_ci": [0.1, 0.5], "net": 0.3,
                                           "net_ci": [0.0, 0.6], "verdict": "no measurable change"}}},
}


def test_card_says_base_teacher_data_settings_figures_and_license(make_config, tiny_student):
    (tiny_student / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    try:
        text = card_text(make_config(), SUMMARY)
    finally:
        (tiny_student / "README.md").unlink()
    assert text.startswith("---\nlicense: apache-2.0\n")
    assert "fake-teacher" in text and tiny_student.name in text
    assert "- training examples: 10" in text and "- teacher answers: 8" in text
    assert "- steps: 6" in text and "r=4, alpha=8" in text
    assert "| loss | 1.034 | 0.9123 | -0.1213 | [-0.2, -0.05] | better |" in text
    assert "| top1_agreement | 0.5 | 0.55 | 0.05 | n/a | no measurable change |" in text
    assert "win 0.6 [0.4, 0.8]" in text and "net 0.3 [0, 0.6]" in text
    assert "whose license applies: apache-2.0" in text


def test_card_without_eval_or_license_says_so(make_config):
    text = card_text(make_config(), {"train": {"steps": 1}})
    assert "Not evaluated yet" in text and "license: other" in text and "not found in its folder" in text


def test_license_follows_a_merged_base_to_its_own_base(tmp_path):
    base, merged = tmp_path / "base", tmp_path / "merged"
    base.mkdir(), merged.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: zh\n---\n")
    (merged / "shifu_config.yaml").write_text(f"model_name: {base}\n")
    assert base_license(str(merged)) == "mit" and base_license(str(tmp_path / "none")) is None


def test_write_card_goes_into_the_merged_folder(make_config):
    cfg = make_config()
    assert write_card(cfg) is None  # no merged folder yet: nothing to describe
    cfg.merged_dir.mkdir(parents=True)
    write_json(cfg.work / "summary.json", SUMMARY)
    path = write_card(cfg)
    assert path == cfg.merged_dir / "README.md" and "| loss |" in path.read_text()


class FakeApi:
    calls: list = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))


def test_push_uploads_the_folder_with_its_card(make_config, monkeypatch):
    import huggingface_hub

    cfg = make_config()
    for folder, marker in ((cfg.merged_dir, "config.json"), (cfg.output_dir, "adapter_config.json")):
        (cfg.merged_dir.parent / folder).mkdir(parents=True, exist_ok=True)
        (cfg.merged_dir.parent / folder / marker).write_text("{}")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    assert "me/student" in run_push(cfg, "me/student", private=True)
    (_, repo, kw), (_, up) = FakeApi.calls
    assert repo == "me/student" and kw["private"] is True and kw["exist_ok"] is True
    assert up["folder_path"] == str(cfg.merged_dir) and up["repo_id"] == "me/student"
    assert (cfg.merged_dir / "README.md").exists()
    FakeApi.calls = []
    run_push(cfg, "me/student-lora", adapter=True)
    assert FakeApi.calls[1][1]["folder_path"] == str(cfg.output_dir)
    assert "library_name: peft" in (cfg.merged_dir.parent / cfg.output_dir / "README.md").read_text()


def test_push_errors_are_one_line(make_config, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    cfg = make_config()
    with pytest.raises(UserError, match="run `shifu merge` first"):
        run_push(cfg, "me/student")
    cfg.merged_dir.mkdir(parents=True)
    (cfg.merged_dir / "config.json").write_text("{}")

    class NoToken(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise LocalTokenNotFoundError("no token")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoToken)
    with pytest.raises(UserError, match="hf auth login"):
        run_push(cfg, "me/student")
