"""`shifu init`: a commented config from a few flags, with training settings that fit the GPU.

    shifu init --teacher deepseek --student Qwen/Qwen2.5-7B-Instruct --data corpus/ --gpu-memory 24 --out my.yaml
    shifu init --teacher openai --base-url http://127.0.0.1:8000/v1 --teacher-model Qwen2.5-72B-Instruct ...

It starts from the shipped configs/deepseek-qwen2.5-7b.yaml (or the built-in defaults where shifu
is installed without its configs folder), sets the teacher, student, data and output paths, then
picks quantization, batch size and accumulation from `shifu estimate`'s memory figure for the
student (or, where the student's config cannot be read, from the parameter count in its name), so
that training fits the GPU memory given. Every field written carries its description as a comment.
Missing answers are asked for only on a terminal; otherwise defaults apply. The API key never goes
in the file: the file names the variable (`teacher.api_key_env`). An existing file is kept unless
`force`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from shifu.config import Config, TeacherConfig, config_from_dict
from shifu.errors import UserError

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "deepseek-qwen2.5-7b.yaml"
TEACHERS = {
    "deepseek": {"kind": "openai", "base_url": "https://api.deepseek.com", "model": "deepseek-flash",
                 "api_key_env": "DEEPSEEK_API_KEY"},
    "openai": {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": None,
               "api_key_env": "OPENAI_API_KEY", "extra_body": {}},
    "local": {"kind": "local", "model": None},
}
DEFAULT_STUDENT = "Qwen/Qwen2.5-7B-Instruct"
HEADROOM = 0.8  # share of the GPU memory the estimate may fill: it is not exact, and memory fragments
# Tried in order; the first whose estimate fits is written. Micro-batch x accumulation stays 16.
CANDIDATES = [
    {"quantization": "none", "batch_size": 4, "gradient_accumulation_steps": 4},
    {"quantization": "4bit", "batch_size": 4, "gradient_accumulation_steps": 4},
    {"quantization": "4bit", "batch_size": 2, "gradient_accumulation_steps": 8},
    {"quantization": "4bit", "batch_size": 1, "gradient_accumulation_steps": 16},
]


def base_tree() -> dict:
    if SHIPPED.is_file():
        return yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    return {}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", Path(name.rstrip("/")).name.lower()).strip("-") or "student"


def teacher_section(teacher: str, base_url: str | None, model: str | None, shipped: dict) -> dict:
    if teacher not in TEACHERS:
        raise UserError(f"--teacher {teacher!r}: choose deepseek, openai or local")
    section = dict(TEACHERS[teacher])  # its keys first, in order; None: to be given
    section.update((k, v) for k, v in shipped.items() if k not in section)
    if teacher == "local":
        section = {k: v for k, v in section.items() if k not in ("base_url", "api_key_env", "max_concurrency")}
    if base_url:
        section["base_url"] = base_url
    if model:
        section["model"] = model
    section = {k: v for k, v in section.items() if v is not None}
    if not section.get("model"):
        raise UserError(f"--teacher {teacher} needs --teacher-model "
                        + ("(a Hugging Face folder)" if teacher == "local" else "(the name the server serves)"))
    if section["model"] not in TeacherConfig().prices:  # a budget needs a price to count against
        section.pop("max_cost", None)
    return section


def _params_from_name(name: str) -> float | None:
    """'Qwen/Qwen2.5-7B-Instruct' -> 7e9; None where the name says nothing."""
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", Path(name).name)
    return float(m.group(1)) * 1e9 if m else None


def _rough_gib(params: float, quantization: str, max_length: int) -> tuple[float, float]:
    """Where the student's config cannot be read: (GiB at batch 1, GiB per further example) from
    weights, ~1 GiB per 4 x 1024 tokens a billion parameters, and the CUDA context."""
    weights = params * (0.6 if quantization == "4bit" else 2) / 1024**3
    per_example = params / 1e9 * max_length / 4096
    return weights + per_example + 1.5, per_example


def batch_costs(tree: dict, quantization: str) -> tuple[float, float] | None:
    """(GiB at batch 1, GiB per further example): activations and logits grow with the batch, the
    rest does not, so one estimate per quantization covers every batch size."""
    from shifu.estimate import memory_estimate

    trial = {**tree, "batch_size": 1, "train": {**tree.get("train", {}), "quantization": quantization}}
    try:
        mem = memory_estimate(config_from_dict(trial, "shifu init"))
    except Exception:  # an estimate that breaks must not stop the config from being written
        mem = {}
    if "total" in mem:
        return mem["total"], mem.get("activations", 0) + mem.get("logits", 0)
    params = _params_from_name(tree.get("model_name", ""))
    return _rough_gib(params, quantization, tree.get("max_length", 512)) if params else None


def pick_training(tree: dict, gpu_gib: float | None) -> tuple[dict, str]:
    """-> the training settings to write, and a comment that says why."""
    if gpu_gib is None:
        return CANDIDATES[0] | {"batch_size": 2, "gradient_accumulation_steps": 8}, \
            "no GPU given or found: settings for CPU (4-bit QLoRA needs CUDA); rerun with --gpu-memory GB"
    costs: dict[str, tuple[float, float] | None] = {}
    for setting in CANDIDATES:
        q = setting["quantization"]
        if q not in costs:
            costs[q] = batch_costs(tree, q)
        if costs[q] is None:
            return CANDIDATES[1], f"student size unknown: 4-bit QLoRA to be safe on {gpu_gib:g} GB"
        need = costs[q][0] + (setting["batch_size"] - 1) * costs[q][1]
        if need <= gpu_gib * HEADROOM:
            how = "4-bit QLoRA" if q == "4bit" else "LoRA on 16-bit weights"
            return setting, f"{how}, batch {setting['batch_size']}: about {need:.1f} GiB of {gpu_gib:g} GB"
    return CANDIDATES[-1], (f"even 4-bit QLoRA with batch 1 needs about {need:.1f} GiB, more than {gpu_gib:g} "
                            "GB: lower max_length, or use a smaller student or a bigger GPU")


def detected_gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1024**3


def build_tree(teacher: str, base_url: str | None, teacher_model: str | None, student: str, data: str,
               gpu_gib: float | None) -> tuple[dict, str]:
    tree = base_tree()
    slug = _slug(student)
    tree.update(raw_data_path=data, model_name=student, output_dir=f"./{slug}-distilled",
                work_dir=f"./{slug}-work", jsonl_output_path=f"./{slug}-data/distill.jsonl")
    if "qwen-7b-chat" in slug:  # the original Qwen ships its modelling code with the weights
        tree["trust_remote_code"] = True
    tree["teacher"] = teacher_section(teacher, base_url, teacher_model, tree.get("teacher", {}))
    setting, why = pick_training(tree, gpu_gib)
    tree["batch_size"] = setting["batch_size"]
    tree["train"] = {**tree.get("train", {}), "quantization": setting["quantization"],
                     "gradient_accumulation_steps": setting["gradient_accumulation_steps"]}
    config_from_dict(tree, "shifu init")  # what is written must load
    return tree, why


# ---- writing, with each field's description as its comment ---------------------------------------

def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip().removesuffix("\n...")


def render(tree: dict, model: type[BaseModel] = Config, indent: str = "") -> list[str]:
    lines = []
    fields = model.model_fields
    for key, value in tree.items():
        field = fields.get(key)
        sub = field.annotation if field is not None else None
        section = isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel)
        if section and not indent:
            lines.append("")
        if field is not None and field.description:
            lines.append(f"{indent}# {field.description}")
        if section:
            lines.append(f"{indent}{key}:")
            lines += render(value, sub, indent + "  ")
        else:
            lines.append(f"{indent}{key}: {_scalar(value)}")
    return lines


def header(tree: dict, why: str, out: Path) -> list[str]:
    tc = tree["teacher"]
    lines = ["# Written by `shifu init`. Every field: README.md, section Configuration.", f"# Training: {why}."]
    if tc.get("kind", "openai") == "openai":
        lines.append(f"#   export {tc.get('api_key_env', 'DEEPSEEK_API_KEY')}=...   # the key never goes in this file"
                     + (" (a server on this machine needs none)" if "127.0.0.1" in tc.get("base_url", "") else ""))
    lines += [f"#   shifu check {out}      # every problem, before anything is spent",
              f"#   shifu estimate {out}   # requests, tokens, price, GPU memory", f"#   shifu run {out}", ""]
    return lines


def ask_missing(values: dict) -> dict:
    """On a terminal, ask for what the flags left out; elsewhere keep the defaults."""
    if not sys.stdin.isatty():
        return values
    import typer

    questions = [("teacher", "Teacher: deepseek, openai or local", "deepseek"),
                 ("base_url", "Teacher server (OpenAI-compatible, e.g. http://127.0.0.1:8000/v1)", None),
                 ("teacher_model", "Teacher model (served name, or a folder for local)", None),
                 ("student", "Student: a Hugging Face folder or hub name", DEFAULT_STUDENT),
                 ("data", "Your text: a file, folder or glob", "data.txt"),
                 ("gpu_memory", "GPU memory in GB (0: no GPU)", None)]
    for key, text, default in questions:
        if values.get(key) is not None or (key == "base_url" and values.get("teacher") != "openai"):
            continue
        if key == "teacher_model" and values.get("teacher") == "deepseek":
            continue
        if key == "gpu_memory":
            found = detected_gpu_gib()
            default = round(found) if found else 0
        answer = typer.prompt(text, default=default, type=float if key == "gpu_memory" else str)
        values[key] = answer
    return values


def run_init(out: str, teacher: str | None = None, base_url: str | None = None, teacher_model: str | None = None,
             student: str | None = None, data: str | None = None, gpu_memory: float | None = None,
             force: bool = False) -> tuple[Path, str]:
    path = Path(out)
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it, or --out another file")
    v = ask_missing({"teacher": teacher, "base_url": base_url, "teacher_model": teacher_model, "student": student,
                     "data": data, "gpu_memory": gpu_memory})
    gpu = v["gpu_memory"] if v["gpu_memory"] is not None else detected_gpu_gib()
    tree, why = build_tree(v["teacher"] or "deepseek", v["base_url"], v["teacher_model"],
                           v["student"] or DEFAULT_STUDENT, v["data"] or "data.txt", gpu or None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header(tree, why, path) + render(tree)) + "\n", encoding="utf-8")
    return path, why
