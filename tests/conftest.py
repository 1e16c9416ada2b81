"""Shared fixtures: tiny models built from a config, tiny tokenizers trained in milliseconds, a fake
OpenAI-compatible server on 127.0.0.1, and a config factory that points everything at them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ZH = ROOT / "data" / "sample_zh.txt"
SAMPLE_EN = ROOT / "data" / "sample_en.txt"
# Texts the read, chunk and dedup tests share: the bundled samples, traditional Chinese, and mixed zh/en.
ZH = SAMPLE_ZH.read_text(encoding="utf-8")
EN = SAMPLE_EN.read_text(encoding="utf-8")
TRAD = ("魯鎮的酒店的格局，是和別處不同的：都是當街一個曲尺形的大櫃檯，櫃裡面預備著熱水，可以隨時溫酒。"
        "做工的人，傍午傍晚散了工，每每花四文銅錢，買一碗酒，——這是二十多年前的事，現在每碗要漲到十文，——靠櫃外站著，熱熱的喝了休息。"
        "孔乙己是站著喝酒而穿長衫的唯一的人。他身材很高大；青白臉色，皺紋間時常夾些傷痕；一部亂蓬蓬的花白的鬍子。"
        "他對人說話，總是滿口之乎者也，教人半懂不懂的。「讀書人的事，能算偷麼？」接連便是難懂的話，什麼「君子固窮」，什麼「者乎」之類。\n\n") * 6
MIXED = "".join(
    f"第{i}次实验里，我们用 PyTorch 2.{i} 训练了一个 0.5B 的 student model。The loss went down to 1.{i} after "
    f"{i * 10} steps, which is good! 但是 eval 的 perplexity 还是很高，原因不明？“需要更多数据。”他说。\n"
    for i in range(40))
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a "
          "helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(folder: Path, vocab_size: int, texts: list[str], byte_level: bool = True):
    """A BPE tokenizer trained on a few KB, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if byte_level:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # a character-level BPE without byte fallback: a very different vocabulary
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_next")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + ["<unk>"])
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>" if not byte_level else None)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return tok


def make_model(folder: Path, tok, arch: str = "qwen2", seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
              tie_word_embeddings=False)
    config = Qwen2Config(**kw) if arch == "qwen2" else LlamaConfig(**kw)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _texts() -> list[str]:
    return [SAMPLE_ZH.read_text(encoding="utf-8"), SAMPLE_EN.read_text(encoding="utf-8")]


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_student")
    return make_model(folder, make_tokenizer(folder, 800, _texts()))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_student) -> Path:
    """Same tokenizer as the student, other weights: a white-box teacher."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny_teacher")
    return make_model(folder, AutoTokenizer.from_pretrained(tiny_student), seed=1)


@pytest.fixture(scope="session")
def other_tokenizer_model(tmp_path_factory) -> Path:
    """A llama-architecture student with a different, character-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_other")
    return make_model(folder, make_tokenizer(folder, 500, _texts(), byte_level=False), arch="llama")


@pytest.fixture()
def fake_server():
    from shifu.fake_openai import FakeServer

    servers = []

    def start(**kwargs):
        server = FakeServer(lifetime=300, **kwargs).__enter__()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.__exit__(None, None, None)


@pytest.fixture()
def make_config(tmp_path, tiny_student):
    """A config dict for a tiny end-to-end run in tmp_path; tests override what they need."""
    from shifu.config import config_from_dict

    def make(server_url: str = "http://127.0.0.1:9/v1", raw: Path = SAMPLE_ZH, **overrides):
        tree = {
            "raw_data_path": str(raw), "model_name": str(tiny_student), "work_dir": str(tmp_path / "work"),
            "output_dir": str(tmp_path / "adapter"), "jsonl_output_path": str(tmp_path / "data" / "distill.jsonl"),
            "batch_size": 2, "learning_rate": 1e-3, "num_epochs": 1, "max_length": 128, "chunk_size": 300,
            "gradient_checkpointing": False,
            "teacher": {"base_url": server_url, "model": "fake-teacher", "max_concurrency": 8, "max_tokens": 64,
                        "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5, "max_attempts": 8},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"report_to": ["none"], "logging_steps": 1, "save_steps": 1000},
            # few generated answers and resamples: the defaults size a real evaluation, not a unit test
            "eval": {"eval_ratio": 0.2, "num_samples": 1, "max_new_tokens": 8, "max_examples": 4,
                     "generate_examples": 2, "knowledge_questions": 2, "bootstrap_samples": 200},
        }
        for dotted, value in overrides.items():
            node = tree
            keys = dotted.split("__")
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = value
        return config_from_dict(tree)

    return make


def write_config(cfg, path: Path) -> Path:
    """The resolved config as YAML, for a `shifu` subprocess."""
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True), encoding="utf-8")
    return path


def run_shifu(*args, env=None, timeout=300):
    """`python -m shifu ...` in a subprocess; returns the CompletedProcess (never raises on failure)."""
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "shifu", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
