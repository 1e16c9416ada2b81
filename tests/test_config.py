"""The one typed config: defaults of the original guide, checked ranges, dotted overrides, redaction."""

import pytest

from shifu.config import Config, config_from_dict, dump_config, load_config, parse_override
from shifu.errors import UserError


def test_defaults_follow_the_original_guide():
    c = Config()
    assert (c.batch_size, c.learning_rate, c.num_epochs, c.max_length, c.chunk_size) == (4, 5e-5, 10, 512, 500)
    assert c.enable_qa and c.enable_article and c.teacher.api_key_env == "DEEPSEEK_API_KEY"
    assert c.teacher.model != "deepseek-chat"  # retired on 2026-07-24
    assert c.lora.target_modules == "all-linear" and c.teacher.kind == "openai"


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description or name in ("data", "tasks", "teacher", "lora", "distill", "train", "eval"), name
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub)

    walk(Config)


@pytest.mark.parametrize("tree, words", [
    ({"batch_sise": 4}, ["unknown key", "batch_sise"]),
    ({"teacher": {"max_concurency": 3}}, ["unknown key", "teacher.max_concurency"]),
    ({"batch_size": "four"}, ["batch_size", "four"]),
    ({"learning_rate": -1}, ["learning_rate"]),
    ({"teacher": {"top_logprobs": 21}}, ["teacher.top_logprobs"]),
    ({"enable_qa": False, "enable_article": False}, ["nothing to do"]),
])
def test_bad_configs_name_the_key(tree, words):
    with pytest.raises(UserError) as err:
        config_from_dict(tree, "x.yaml")
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_dotted_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 2\nteacher:\n  model: m\n", encoding="utf-8")
    cfg = load_config(path, ["teacher.max_concurrency=32", "learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.teacher.max_concurrency == 32 and cfg.teacher.model == "m" and cfg.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.batch_size == 2
    assert parse_override("a.b=true") == ("a.b", True)
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_override("novalue")


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n", encoding="utf-8")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_dump_redacts_secret_looking_fields():
    cfg = Config(teacher={"extra_body": {"api_key": "sk-test-123456", "thinking": {"type": "disabled"}}})
    text = dump_config(cfg)
    assert "sk-test-123456" not in text and "<redacted>" in text and "DEEPSEEK_API_KEY" in text


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("extra_body", "prices", "custom"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_shipped_configs_load_with_every_value_they_set():
    import os

    import yaml
    from conftest import ROOT

    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        cfg = load_config(path).model_dump(mode="json")
        for dotted, value in _leaves(yaml.safe_load(path.read_text(encoding="utf-8"))):
            got = cfg
            for key in dotted.split("."):
                got = got[key]
            if isinstance(value, str) and ("~" in value or "$" in value):
                value = os.path.expandvars(os.path.expanduser(value))
            if isinstance(value, dict):
                assert all(got.get(k) == v or isinstance(v, dict) for k, v in value.items()), (path.name, dotted)
            else:
                assert got == value, (path.name, dotted, got, value)


def test_every_config_error_is_reported_at_once_one_line_each():
    tree = {"batch_sise": 4, "learning_rate": -1, "teacher": {"max_concurency": 3, "top_logprobs": 21}}
    with pytest.raises(UserError) as err:
        config_from_dict(tree, "x.yaml")
    lines = str(err.value).splitlines()
    assert len(lines) == 4 and all(line.startswith("x.yaml: ") for line in lines), lines
    for words in ("batch_sise", "learning_rate", "teacher.max_concurency", "teacher.top_logprobs"):
        assert sum(words in line for line in lines) == 1, (words, lines)


def test_cross_field_checks_all_run_with_the_config_not_in_a_stage():
    tree = {"enable_qa": False, "enable_article": False, "chunk_size": 100, "data": {"chunk_overlap": 100},
            "teacher": {"model": "unpriced", "max_cost": 5.0},
            "tasks": {"custom": {"k": {"category": "问答", "instruction": "{nope}"}}}}
    with pytest.raises(UserError) as err:
        config_from_dict(tree, "x.yaml")
    lines = str(err.value).splitlines()
    assert len(lines) == 3, lines  # custom kind k keeps the run from having nothing to do
    for words in ("chunk_overlap", "teacher.prices has no entry for teacher.model 'unpriced'",
                  "tasks.custom.k.instruction: bad placeholder"):
        assert any(words in line for line in lines), (words, lines)


def test_readme_configuration_table_is_current():
    """The README's table is generated (python scripts/config_table.py --write); a stale one fails here."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    import config_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert config_table.table() in readme, "run: python scripts/config_table.py --write"


def test_chinese_readme_configuration_table_is_current_and_the_readmes_link_each_other():
    """README.zh-CN.md gets the same rows under Chinese headings, from the same --write."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    import config_table

    zh = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    assert config_table.table("zh") in zh, "run: python scripts/config_table.py --write"
    assert config_table.table("zh").splitlines()[2:] == config_table.table("en").splitlines()[2:]
    en = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(README.zh-CN.md)" in en.split("\n## ")[0] and "(README.md)" in zh.split("\n## ")[0]


def test_accelerate_configs_parse_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from conftest import ROOT

    paths = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        cfg = load_config_from_file(str(path))
        assert str(cfg.distributed_type).split(".")[-1] in ("MULTI_GPU", "FSDP", "DEEPSPEED"), path.name
