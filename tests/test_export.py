"""shifu export: llama.cpp's converter and quantiser, metadata carried over, an Ollama Modelfile that
renders what the chat template renders, and greedy agreement between llama.cpp and transformers.

The conversion tests need llama.cpp's converter (`make export-tools`, which `make test` runs); the
agreement checks need llama-cpp-python (compiled by `make .venv/.demo-installed`)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from shifu.errors import UserError
from shifu.export import (
    CHATML_GO,
    agreement,
    converter_dir,
    gguf_metadata,
    modelfile,
    ollama_template,
    run_export,
    unpack_converter,
)
from shifu.models import FALLBACK_TEMPLATE, load_tokenizer

needs_converter = pytest.mark.skipif(not (converter_dir() / "convert_hf_to_gguf.py").exists(),
                                     reason="llama.cpp's converter is not fetched: make export-tools")


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def test_unpack_takes_only_the_converter_and_its_gguf_py(tmp_path):
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    files = {"vendor/llama.cpp/convert_hf_to_gguf.py": "print('convert')", "vendor/llama.cpp/conversion/qwen.py": "",
             "vendor/llama.cpp/gguf-py/gguf/__init__.py": "", "vendor/llama.cpp/ggml/src/big.c": "int x;",
             "llama_cpp/llama.py": ""}
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    dest = unpack_converter(sdist, tmp_path / "llama.cpp")
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["conversion/qwen.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    empty = tmp_path / "other.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(UserError, match="convert_hf_to_gguf.py"):
        unpack_converter(empty, tmp_path / "x")


def test_modelfile_template_renders_like_the_chat_template(tiny_student):
    tok = load_tokenizer(str(tiny_student))
    template, system = ollama_template(tok)
    assert template == CHATML_GO and system == "You are a helpful assistant."
    text = modelfile(tok, "model-q8_0.gguf", ["<|im_end|>", "<|endoftext|>"])
    assert "FROM ./model-q8_0.gguf\n" in text and f'TEMPLATE """{CHATML_GO}"""' in text
    assert 'SYSTEM """You are a helpful assistant."""' in text
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n' in text


def test_a_template_that_is_not_chatml_gets_no_made_up_template(tiny_student):
    tok = load_tokenizer(str(tiny_student))
    tok.chat_template = FALLBACK_TEMPLATE
    assert ollama_template(tok) == (None, None)
    text = modelfile(tok, "m.gguf", ["<|im_end|>"])
    assert "TEMPLATE \"\"\"" not in text and "reads the chat template from the GGUF" in text


def test_agreement_counts_the_identical_prefix():
    got = agreement([([1, 2, 3, 4], [1, 2, 3, 4]), ([1, 2, 3, 4], [1, 2, 9, 4]), ([5, 6], [7])])
    assert got == {"prompts": 3, "exact": 1, "token_agreement": 0.6, "same_prefix": [4, 2, 0]}


def test_export_needs_a_merged_model_and_a_known_quant(make_config):
    cfg = make_config()
    with pytest.raises(UserError, match="--quant 'q5'"):
        run_export(cfg, "q5")
    with pytest.raises(UserError, match="run `shifu merge` first"):
        run_export(cfg, "q8_0")


def test_missing_converter_says_how_to_get_it(make_config, tiny_student, monkeypatch, tmp_path):
    cfg = make_config()
    shutil.copytree(tiny_student, cfg.merged_dir)
    monkeypatch.setenv("SHIFU_LLAMA_CPP", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="make export-tools"):
        run_export(cfg, "f16", check=False)


@needs_converter
def test_tiny_export_carries_template_and_end_tokens(make_config, tiny_student):
    cfg = make_config()
    shutil.copytree(tiny_student, cfg.merged_dir)
    # The tiny tokenizer is unknown to llama.cpp's hash table; its pre-tokenizer is GPT-2's byte-level regex.
    with pytest.raises(UserError, match="--pre-tokenizer"):
        run_export(cfg, "f16", check=False)
    report = run_export(cfg, "q8_0", check=_has_llama_cpp(), pre_tokenizer="gpt-2")
    gguf = Path(report["gguf"])
    meta = gguf_metadata(gguf)
    assert meta["tokenizer.chat_template"] == load_tokenizer(str(tiny_student)).chat_template
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["general.architecture"] == "qwen2"
    assert report["end_tokens"] == ["<|im_end|>", "<|endoftext|>"] and report["ollama_template"] == "chatml"
    assert (gguf.parent / "Modelfile").read_text().startswith("# Made by `shifu export`")
    assert json.loads((gguf.parent / "export.json").read_text())["quant"] == "q8_0"
    assert (cfg.merged_dir / "README.md").exists()  # the card is refreshed with the export
    assert not [p for p in gguf.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    if _has_llama_cpp():
        check = report["check"]
        assert check["prompt_tokens_equal"] == check["prompts"] and check["end_tokens_not_eog"] == []
        # Random tiny weights have near-tied logits, which 8-bit weights may flip; the real model is held
        # to more in the slow test.
        assert check["exact"] >= check["prompts"] // 2 and check["token_agreement"] >= 0.5, check


@needs_converter
@pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python is not installed")
def test_tiny_f16_and_q4_k_m(make_config, tiny_student):
    cfg = make_config()
    shutil.copytree(tiny_student, cfg.merged_dir)
    f16 = run_export(cfg, "f16", pre_tokenizer="gpt-2")
    assert f16["check"]["exact"] == f16["check"]["prompts"], f16["check"]
    q4 = run_export(cfg, "q4_k_m", check=False, pre_tokenizer="gpt-2")
    assert gguf_metadata(Path(q4["gguf"]))["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert q4["bytes"] < f16["bytes"]


STUDENT = Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu")) / "hf" / "qwen0.5b"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@needs_converter
@pytest.mark.skipif(not (STUDENT / "config.json").exists(), reason="python scripts/fetch_models.py qwen0.5b")
@pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_real_student_gguf_answers_like_transformers(make_config, quant):
    """Qwen2.5-Coder-0.5B-Instruct as the merged student: llama.cpp on the export vs transformers."""
    cfg = make_config(model_name=str(STUDENT))
    cfg.merged_dir.mkdir(parents=True)
    for f in STUDENT.iterdir():  # links, not a 2 GB copy; the card is written beside them
        (cfg.merged_dir / f.name).symlink_to(f)
    report = run_export(cfg, quant)
    check = report["check"]
    print(f"\n{quant}: {json.dumps(check)} ({report['bytes'] / 1e6:.0f} MB, {report['seconds']}s)")
    assert report["pre_tokenizer"] == "qwen2" and report["ollama_template"] == "chatml"
    assert check["prompt_tokens_equal"] == check["prompts"]
    assert check["end_tokens_not_eog"] == []  # <|im_end|>, <|endoftext|> and Qwen's </s> stop llama.cpp too
    # Measured here (docs/BENCHMARKS.md): f16 4/4 identical; q8_0 3/4, the fourth identical for 12 of
    # 24 tokens before a near-tie flipped. q4_k_m is measured, not held to a bound.
    if quant == "f16":
        assert check["exact"] == check["prompts"], check
    if quant == "q8_0":
        assert check["token_agreement"] >= 0.75, check
