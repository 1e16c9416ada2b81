"""Print the configuration reference (every field, its default and its one-line doc) as Markdown.

    python scripts/config_table.py            # print
    python scripts/config_table.py --write    # refresh the table in README.md between its markers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from shifu.config import Config

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


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


def table() -> str:
    return "\n".join(["| field | default | what it does |", "| --- | --- | --- |", *rows(Config)])


def main() -> None:
    if "--write" in sys.argv:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        text = readme.read_text(encoding="utf-8")
        head, rest = text.split(START)
        _, tail = rest.split(END)
        readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}", encoding="utf-8")
    else:
        print(table())


if __name__ == "__main__":
    main()
