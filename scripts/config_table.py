"""Print the configuration reference (every field, its default and its one-line doc) as Markdown.

    python scripts/config_table.py            # print
    python scripts/config_table.py --zh       # print, with the headings of README.zh-CN.md
    python scripts/config_table.py --write    # refresh the table in README.md and README.zh-CN.md between their markers

Both READMEs get the same rows from the same source (the field descriptions in shifu.config); the
Chinese one has Chinese headings and keeps the descriptions in English.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from shifu.config import Config

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
HEADINGS = {"en": "| field | default | what it does |", "zh": "| 字段 | 默认值 | 作用 |"}
READMES = {"en": "README.md", "zh": "README.zh-CN.md"}


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += rows(ann, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        if isinstance(default, dict) and default and all(isinstance(v, BaseModel) for v in default.values()):
            default = {k: v.model_dump(exclude_none=True) for k, v in default.items()}
        shown = json.dumps(default, ensure_ascii=False) if not isinstance(default, str) else default
        shown = "(required)" if field.is_required() else shown
        shown = shown.replace("|", "\\|")
        if len(shown) > 60:
            shown = shown[:57] + "..."
        out.append(f"| `{prefix}{name}` | `{shown}` | {field.description or ''} |")
    return out


def table(lang: str = "en") -> str:
    return "\n".join([HEADINGS[lang], "| --- | --- | --- |", *rows(Config)])


def write(lang: str) -> None:
    readme = Path(__file__).resolve().parents[1] / READMES[lang]
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{table(lang)}\n{END}{tail}", encoding="utf-8")


def main() -> None:
    if "--write" in sys.argv:
        for lang in READMES:
            write(lang)
    else:
        print(table("zh" if "--zh" in sys.argv else "en"))


if __name__ == "__main__":
    main()
