"""The dataset in the formats other training tools read, beside shifu's own Alpaca JSONL.

    shifu dataset configs/demo.yaml --set 'dataset.formats=[messages, sharegpt]'

For `jsonl_output_path` = data/distill.jsonl (and its held-out data/distill.eval.jsonl) this writes
- data/distill.messages.jsonl: OpenAI-style {"messages": [{"role", "content"}, ...]}; a thinking
  teacher's reasoning rides on the assistant message as `reasoning_content`, the field chat
  templates such as Qwen3's render inside <think>...</think>.
- data/distill.sharegpt.jsonl: {"conversations": [{"from": "human"|"gpt", "value"}], "system"?};
  the reasoning goes inside <think>...</think> (train.reasoning_tag) before the answer, the way
  LLaMA-Factory's reasoning templates expect it.
- data/dataset_info.json: an entry per file (alpaca, sharegpt, and messages as sharegpt with
  OpenAI tags), merged into any dataset_info.json already there, so LLaMA-Factory trains on the
  files unchanged with `dataset_dir: data` and `dataset: distill` (or distill_sharegpt, ...).
  LLaMA-Factory reads no `reasoning_content`: for reasoning, train it on the sharegpt entry.
"""

from __future__ import annotations

import json
from pathlib import Path

from shifu.config import Config
from shifu.errors import UserError
from shifu.files import write_json, write_jsonl
from shifu.tasks import format_prompt

SUFFIX = {"messages": ".messages", "sharegpt": ".sharegpt"}


def turns(example: dict) -> list[tuple[str, str, str]]:
    """(user, assistant, reasoning) per exchange: a multi-turn example's earlier turns, then its own."""
    earlier = [(t["user"], t["assistant"], t.get("reasoning", "")) for t in example.get("history", [])]
    return earlier + [(format_prompt(example["instruction"], example["input"]), example["output"],
                       example.get("reasoning", ""))]


def messages_record(example: dict, system: str | None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer, reasoning in turns(example):
        messages.append({"role": "user", "content": user})
        assistant = {"role": "assistant", "content": answer}
        if reasoning:
            assistant["reasoning_content"] = reasoning
        messages.append(assistant)
    return {"messages": messages}


def with_reasoning(answer: str, reasoning: str, tag: str) -> str:
    """The answer after its reasoning wrapped in <tag>...</tag>, as reasoning templates print it."""
    return f"<{tag}>\n{reasoning}\n</{tag}>\n\n{answer}" if reasoning else answer


def sharegpt_record(example: dict, system: str | None, tag: str) -> dict:
    conversations = []
    for user, answer, reasoning in turns(example):
        conversations += [{"from": "human", "value": user},
                          {"from": "gpt", "value": with_reasoning(answer, reasoning, tag)}]
    return {"conversations": conversations, **({"system": system} if system else {})}


def info_entry(fmt: str, file_name: str, system: bool) -> dict:
    """One dataset_info.json entry in LLaMA-Factory's documented format (data/README.md there)."""
    if fmt == "alpaca":
        return {"file_name": file_name, "formatting": "alpaca",
                "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    if fmt == "sharegpt":
        return {"file_name": file_name, "formatting": "sharegpt",
                "columns": {"messages": "conversations", **({"system": "system"} if system else {})},
                "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}
    return {"file_name": file_name, "formatting": "sharegpt", "columns": {"messages": "messages"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                     "assistant_tag": "assistant", "system_tag": "system"}}


def format_path(alpaca: Path, fmt: str) -> Path:
    return alpaca.with_name(alpaca.stem + SUFFIX[fmt] + alpaca.suffix)


def write_formats(cfg: Config, examples: list[dict]) -> dict:
    """The extra files for dataset.formats and their dataset_info.json entries -> {file: rows}."""
    system, tag = cfg.train.system_prompt, cfg.train.reasoning_tag
    entries, written = {}, {}
    for split, alpaca in (("train", Path(cfg.jsonl_output_path)), ("eval", cfg.eval_jsonl_path)):
        rows = [e for e in examples if e["split"] == split]
        name = alpaca.stem.replace(".", "_")
        entries[name] = info_entry("alpaca", alpaca.name, False)
        for fmt in cfg.dataset.formats:
            path = format_path(alpaca, fmt)
            make = (lambda e: messages_record(e, system)) if fmt == "messages" else (
                lambda e: sharegpt_record(e, system, tag))
            written[str(path)] = write_jsonl(path, (make(e) for e in rows))
            entries[f"{name}_{fmt}"] = info_entry(fmt, path.name, bool(system))
    if cfg.dataset.formats:
        info = Path(cfg.jsonl_output_path).with_name("dataset_info.json")
        written[str(info)] = len(entries)
        write_json(info, {**read_info(info), **entries})
    return written


def read_info(path: Path) -> dict:
    """An existing dataset_info.json (other datasets of a LLaMA-Factory data folder are kept)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON; fix or remove it, and shifu dataset writes it again "
                        "with the entries for this dataset") from None
    return data if isinstance(data, dict) else {}
