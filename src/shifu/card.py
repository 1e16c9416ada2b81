"""The model card (README.md) of a distilled student, and `shifu push` to the Hugging Face Hub.

    shifu push configs/demo.yaml --repo me/qwen-kongyiji            # the merged folder
    shifu push configs/demo.yaml --repo me/qwen-kongyiji-lora --adapter

The card is made from the run's <work_dir>/summary.json and its config: the base model and its
license, the teacher, how much data, the run's settings and the evaluation figures with their
intervals where the summary has them. `merge` writes it into the merged folder; `export` and `push`
write it again, since evaluation runs after merge. No secret is in the config dump it reads.
"""

from __future__ import annotations

import re
from pathlib import Path

from shifu.config import Config
from shifu.errors import UserError
from shifu.files import read_json, write_text

# Anything of these shapes in a summary is an interval: paired_change's "ci", win_rates' "<rate>_ci".
_CI_KEYS = ("ci", "ci95", "interval")


def base_license(model_name: str, depth: int = 0) -> str | None:
    """The license the base declares in its README's front matter; a merged folder used as a base
    points to its own base through its shifu_config.yaml."""
    folder = Path(model_name).expanduser()
    readme = folder / "README.md"
    if readme.exists():
        match = re.search(r"^---\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.DOTALL)
        found = match and re.search(r"^license:\s*(\S+)", match.group(1), re.MULTILINE)
        if found and found.group(1).strip("'\"") != "other":
            return found.group(1).strip("'\"")
    saved = folder / "shifu_config.yaml"
    if saved.exists() and depth < 3:
        import yaml

        parent = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("model_name")
        return base_license(parent, depth + 1) if parent else None
    return None


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"[{value[0]:.4g}, {value[1]:.4g}]"
    return str(value)


def _change_rows(changes: dict) -> list[str]:
    rows = ["| metric | before | after | change | 95% interval | verdict |", "|---|---|---|---|---|---|"]
    for name, c in changes.items():
        if isinstance(c, dict) and "before" in c:
            ci = next((c[k] for k in _CI_KEYS if c.get(k) is not None), None)
            rows.append(f"| {name} | {fmt(c.get('before'))} | {fmt(c.get('after'))} | {fmt(c.get('change'))} | "
                        f"{fmt(ci) if ci is not None else 'n/a'} | {c.get('verdict', '')} |")
    return rows


def _before_after_rows(before: dict, after: dict) -> list[str]:
    rows = ["| metric | before | after |", "|---|---|---|"]
    rows += [f"| {k} | {fmt(before[k])} | {fmt(after.get(k))} |" for k in before if not isinstance(before[k], dict)]
    return rows


def _rates(name: str, r: dict) -> str:
    """A judged comparison: rates with their intervals, e.g. win 0.6 [0.4, 0.8]."""
    parts = [f"{k[:-5]} {fmt(r[k])}" + (f" {fmt(r[k[:-5] + '_ci'])}" if r.get(k[:-5] + "_ci") else "")
             for k in r if k.endswith("_rate")]
    if "net" in r:
        parts.append(f"net {fmt(r['net'])}" + (f" {fmt(r['net_ci'])}" if r.get("net_ci") else ""))
    return f"- {name}: " + ", ".join(parts) + (f" ({r['verdict']})" if r.get("verdict") else "")


def eval_section(ev: dict) -> list[str]:
    if not ev:
        return ["Not evaluated yet: `shifu eval CONFIG`, then `shifu export` or `shifu push` rewrites this card."]
    lines = [f"Held-out examples (chunks never trained on): {ev.get('held_out_examples', 'n/a')}.", ""]
    if isinstance(ev.get("changes"), dict):
        lines += _change_rows(ev["changes"])
    elif isinstance(ev.get("before"), dict) and isinstance(ev.get("after"), dict):
        lines += _before_after_rows(ev["before"], ev["after"])
    judged = [(k, v) for k, v in ev.items() if isinstance(v, dict) and any(x.endswith("_rate") for x in v)]
    for parent, value in [(k, v) for k, v in ev.items() if isinstance(v, dict)]:
        judged += [(f"{parent} {k}", v) for k, v in value.items()
                   if isinstance(v, dict) and any(x.endswith("_rate") for x in v)]
    if judged:
        lines += ["", "Judged comparisons (rates with 95% intervals):", ""] + [_rates(k, v) for k, v in judged]
    return lines


def _data_lines(summary: dict) -> list[str]:
    picks = [("chunk", "chunks", "text chunks"), ("tasks", "tasks", "tasks"),
             ("teach", "done", "teacher answers"), ("teach", "completion_tokens", "teacher output tokens"),
             ("teach", "cost", "teacher cost"), ("dataset", "train_examples", "training examples"),
             ("dataset", "eval_examples", "held-out examples")]
    return [f"- {what}: {fmt(summary[stage][key])}" for stage, key, what in picks
            if isinstance(summary.get(stage), dict) and key in summary[stage]]


def card_text(cfg: Config, summary: dict, adapter: bool = False) -> str:
    license_ = base_license(cfg.model_name)
    base = cfg.model_name if not Path(cfg.model_name).expanduser().exists() else Path(cfg.model_name).name
    front = ["---", f"license: {license_ or 'other'}", f"library_name: {'peft' if adapter else 'transformers'}",
             "tags: [shifu, distillation, lora]"]
    if not Path(cfg.model_name).expanduser().exists():
        front.append(f"base_model: {cfg.model_name}")
    train = summary.get("train", {}) if isinstance(summary.get("train"), dict) else {}
    settings = {"epochs": cfg.num_epochs, "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size,
                "max_length": cfg.max_length, "lora": f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, "
                f"targets={cfg.lora.target_modules}", "quantization": cfg.train.quantization,
                "distillation": f"{cfg.distill.variant}, kd_ratio={cfg.distill.kd_ratio}, "
                f"temperature={cfg.distill.temperature}, teacher top-k={cfg.teacher.top_logprobs}"}
    settings.update({k: train[k] for k in ("steps", "train_loss", "kd_source", "kd_coverage") if k in train})
    what = "LoRA adapter" if adapter else "merged model (safetensors)"
    lines = front + ["---", "", f"# {base}, distilled with shifu", "",
                     f"A {what}: the student `{base}` trained on answers of the teacher `{cfg.teacher.model}` "
                     f"({cfg.teacher.kind} teacher) about the text in `{Path(cfg.raw_data_path).name}`, "
                     "with LoRA and token-level distillation (shifu).", "", "## Data", ""]
    lines += _data_lines(summary) or ["- no data figures in the summary"]
    lines += ["", "## Training", ""] + [f"- {k}: {fmt(v)}" for k, v in settings.items()]
    lines += ["", "## Evaluation", ""] + eval_section(summary.get("eval") or {})
    lines += ["", "## Use", "", "```bash", "shifu chat <this folder> --prompt \"...\"", "```", "",
              "## License", "",
              f"The weights derive from `{base}`, whose license applies: {license_}." if license_ else
              f"The weights derive from `{base}`: its license applies (not found in its folder; check it)."]
    return "\n".join(lines) + "\n"


def write_card(cfg: Config, folder: Path | None = None, adapter: bool = False) -> Path | None:
    """Write README.md into `folder` (default: the merged folder, if there is one)."""
    folder = Path(folder) if folder is not None else cfg.merged_dir
    if not folder.is_dir():
        return None
    path = folder / "README.md"
    write_text(path, card_text(cfg, read_json(cfg.work / "summary.json", {}), adapter))
    return path


def run_push(cfg: Config, repo: str, adapter: bool = False, private: bool = False) -> str:
    folder = Path(cfg.output_dir) if adapter else cfg.merged_dir
    marker = "adapter_config.json" if adapter else "config.json"
    if not (folder / marker).exists():
        raise UserError(f"{folder}: no {marker}; run `shifu {'train' if adapter else 'merge'}` first")
    write_card(cfg, folder, adapter)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message="Upload a student distilled with shifu",
                          ignore_patterns=["*.pt", "*.pth", "*.bin", "*.pkl", ".*"])
    except LocalTokenNotFoundError:
        raise UserError("huggingface_hub has no token: run `hf auth login` or set HF_TOKEN") from None
    except HfHubHTTPError as err:
        raise UserError(f"push to {repo} failed: {str(err).splitlines()[0]}") from None
    return f"pushed {folder} to {getattr(url, 'url', None) or repo}"

