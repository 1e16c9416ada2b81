"""`shifu check`: every problem a run would hit, found in seconds and before anything is spent.

    shifu check configs/deepseek-qwen2.5-7b.yaml
    from shifu.check import run_check, print_check
    print_check(run_check(cfg))

One line per check, each failure with its fix: the config, the input files (found, their
encodings and size), the API key variable, the teacher (reachable, the model known, top-k
logprobs returned), the student and any local teacher (folder or cached hub name, tokenizer,
chat template, safetensors weights), the output folders (writable), free disk for dataset,
checkpoints and merged model, and the GPU against `shifu estimate`'s memory figure. Every check
runs even when an earlier one failed, so one run shows everything to fix. The teacher costs at
most one request of one token (its price is shown); a server with GET /models costs nothing
unless logprobs must be tried. `shifu run` runs the same checks first (`--skip-check` skips them).
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shifu.config import Config
from shifu.errors import UserError
from shifu.files import nearest_existing, unwritable

MAX_SNIFFED_FILES = 1000  # encodings detected for this many input files; the rest are only sized


@dataclass
class Result:
    name: str
    status: str  # ok, warn (allowed), fail, skip (not applicable here)
    detail: str
    fix: str = ""


def ok(name: str, detail: str) -> Result:
    return Result(name, "ok", detail)


def fail(name: str, detail: str, fix: str = "") -> Result:
    return Result(name, "fail", detail, fix)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# ---- config ---------------------------------------------------------------------------------------

def _drop(tree: dict, loc: tuple) -> bool:
    """Remove the deepest key of loc that the tree holds, so validation can go on without it."""
    keys = [str(k) for k in loc]
    for depth in range(len(keys), 0, -1):
        node = tree
        for k in keys[:depth - 1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[depth - 1] in node:
            del node[keys[depth - 1]]
            return True
    return False


def _raw_tree(path: str, overrides: list[str]) -> dict:
    import yaml

    from shifu.config import _set_dotted, parse_override

    tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    return tree


def check_config_file(path: str, overrides: list[str] | None = None) -> tuple[Config | None, list[Result]]:
    """The config, and its problems: every invalid field is reported, then left at its default so
    the other checks still run on the rest."""
    from pydantic import ValidationError

    from shifu.config import config_from_dict, load_config

    fix = "fix the field it names (README: the configuration table)"
    try:
        return load_config(path, overrides), [ok("config", f"{path}: valid")]
    except UserError as err:
        results = [fail("config", line, fix) for line in str(err).splitlines()]
    try:
        tree = _raw_tree(path, overrides or [])
    except Exception:  # unreadable file, bad YAML or --set: load_config's line already says so
        return None, results
    seen = {r.detail for r in results}
    for _ in range(20):
        try:
            cfg = Config.model_validate(tree)
        except ValidationError as err:
            try:
                config_from_dict(tree, path)
            except UserError as again:  # the same lines as load_config's, for what dropping uncovered
                results += [fail("config", line, fix) for line in str(again).splitlines() if line not in seen]
                seen.update(str(again).splitlines())
            dropped = [_drop(tree, e["loc"]) for e in err.errors()]
            if not any(dropped):  # a problem across fields: no default to fall back on
                return None, results
            continue
        results.append(Result("config", "warn", "the checks below ran with the defaults of the invalid fields"))
        return cfg, results
    return None, results


# ---- input ----------------------------------------------------------------------------------------

def check_inputs(cfg: Config) -> tuple[list[Result], int]:
    """-> results, total input bytes."""
    import importlib.util

    from shifu import read
    from shifu.read import detect_encoding, find_sources

    try:
        files = find_sources(cfg.raw_data_path)
    except UserError as err:
        return [fail("input", str(err))], 0
    size = sum(f.stat().st_size for f in files)
    results, encodings = [], Counter()
    for f in files[:MAX_SNIFFED_FILES]:
        suffix = f.suffix.lower()
        extra = {".pdf": "pypdf", ".docx": "docx"}.get(suffix)
        if extra:
            encodings[suffix[1:]] += 1
            if importlib.util.find_spec(extra) is None:
                results.append(fail("input", f"{f}: reading {suffix} files needs {extra}", "pip install 'shifu[docs]'"))
            continue
        try:
            encodings[detect_encoding(f, cfg.data.encoding)] += 1
        except UserError as err:  # a binary file among several is skipped by the reader, alone it stops it
            skipped = isinstance(err, getattr(read, "BinaryInput", ())) and len(files) > 1
            results.append(Result("input", "warn", f"skipped: {err}") if skipped else fail("input", str(err)))
    if size == 0:
        results.append(fail("input", f"raw_data_path {cfg.raw_data_path!r}: every file is empty",
                            "point raw_data_path at your text"))
    shown = ", ".join(f"{e}: {n}" if len(files) > 1 else e for e, n in encodings.most_common())
    more = f"; encodings of the first {MAX_SNIFFED_FILES}" if len(files) > MAX_SNIFFED_FILES else ""
    names = files[0].name if len(files) == 1 else f"{len(files)} files"
    results.insert(0, ok("input", f"{names}, {human(size)} ({shown}{more})"))
    return results, size


# ---- models ---------------------------------------------------------------------------------------

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached_weights(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(name, f), str)
                   for f in ("model.safetensors", "model.safetensors.index.json"))
    except ValueError:  # not a valid repo id either: the tokenizer line says what is wrong
        return False


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def check_model(name: str, field: str, trust_remote_code: bool, role: str) -> tuple[list[Result], int | None]:
    """A model folder or hub name: resolvable, tokenizer loads, chat template, safetensors weights.
    -> results, bytes of its safetensors weights where known."""
    path = Path(name).expanduser()
    local = name.startswith((".", "/", "~")) or path.exists()
    if local and not path.is_dir():
        return [fail(role, f"{field} {name!r}: folder not found",
                     f"point {field} at a Hugging Face model folder (config.json, tokenizer, *.safetensors)")], None
    fetch_fix = f"download it (hf download {name} --local-dir DIR) and point {field} at the folder"
    if not local and _offline() and not _cached_weights(name):
        return [fail(role, f"{field} {name!r}: no such folder, and as a hub name its weights are not in the "
                     "local cache (HF_HUB_OFFLINE is set)", fetch_fix)], None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as err:  # OSError, ValueError, a remote-code import error: all mean "cannot load"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return [fail(role, f"{field} {name!r}: its tokenizer does not load ({first})",
                     f"point {field} at a complete model folder" if local else fetch_fix)], None
    size = _weights_bytes(path) if local else None
    where = f"{human(size)} of safetensors" if size else "from the Hugging Face cache" if _offline() else "hub"
    results = [ok(role, f"{name}: tokenizer of {len(tok)} tokens, {where}")]
    if local and not size:
        results.append(fail(role, f"{field} {name!r}: no *.safetensors weights (shifu loads safetensors only)",
                            "convert it: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)"))
    if not tok.chat_template:
        results.append(Result(role, "warn", f"{name} has no chat template; prompts use a plain "
                              "'### Instruction / ### Response' format"))
    return results, size


# ---- folders and disk -----------------------------------------------------------------------------

def _outputs(cfg: Config) -> dict[str, Path]:
    return {"work_dir": cfg.work, "output_dir": Path(cfg.output_dir), "<output_dir>_merged": cfg.merged_dir,
            "jsonl_output_path": Path(cfg.jsonl_output_path).parent}


def check_folders(cfg: Config) -> list[Result]:
    bad = [fail("folders", f"{field} {str(p)!r}: {why}", f"set {field} to a folder you can write")
           for field, p in _outputs(cfg).items() if (why := unwritable(p))]
    return bad or [ok("folders", "every output folder can be written (" + ", ".join(_outputs(cfg)) + ")")]


def _params(text: str | None) -> float:
    """'7.62B' or '40.4M' (memory_estimate's figures) -> a count."""
    m = re.fullmatch(r"([\d.]+)([BM])", text or "")
    return float(m.group(1)) * (1e9 if m.group(2) == "B" else 1e6) if m else 0.0


def disk_needs(cfg: Config, input_bytes: int, student_bytes: int, lora_params: float) -> dict[str, int]:
    """Rough bytes each output needs: teacher store, tokenized and aligned data, checkpoints, models."""
    text = input_bytes if not cfg.data.max_chunks else min(input_bytes, cfg.data.max_chunks * cfg.chunk_size * 4)
    chunks = text / (cfg.chunk_size * 2) + 1  # ~2 bytes a character over a mix of CJK and Latin
    per_chunk = (1 + cfg.tasks.qa_per_chunk) * cfg.enable_qa + cfg.enable_article + len(cfg.tasks.custom)
    answers = chunks * per_chunk * cfg.teacher_data_ratio
    tokens = answers * cfg.teacher.max_tokens * cfg.teacher.expected_output_ratio
    k = max(cfg.teacher.top_logprobs, cfg.distill.local_top_k if cfg.distill.source == "local" else 0)
    # chunks, tasks (each holds its chunk), examples and dataset; the store's text, logprobs; kd/ targets
    work = text * (2 + 2 * per_chunk) + tokens * (4 + 12 * k) + tokens * 8 * (k + 1)
    adapter = lora_params * 4  # fp32
    checkpoints = cfg.train.save_total_limit * adapter * 3  # adapter + AdamW's two moments
    return {"work_dir": int(work + checkpoints), "output_dir": int(adapter),
            "<output_dir>_merged": int(student_bytes), "jsonl_output_path": int(text * 2 * per_chunk)}


def check_disk(cfg: Config, needs: dict[str, int]) -> list[Result]:
    by_fs: dict[int, tuple[Path, dict[str, int]]] = {}
    for field, path in _outputs(cfg).items():
        p = nearest_existing(path)
        if not p.is_dir():
            continue  # check_folders reports it
        by_fs.setdefault(p.stat().st_dev, (p, {}))[1][field] = needs.get(field, 0)
    results = []
    for p, parts in by_fs.values():
        free = shutil.disk_usage(p).free
        need = sum(parts.values())
        shown = ", ".join(f"{k} {human(v)}" if v or k != "<output_dir>_merged" else f"{k} unknown (no student size)"
                          for k, v in parts.items())
        if need > free:
            results.append(fail("disk", f"{p}: about {human(need)} needed ({shown}), {human(free)} free",
                                "free some space, or point work_dir/output_dir at a bigger disk"))
        else:
            results.append(ok("disk", f"{p}: about {human(need)} needed ({shown}), {human(free)} free"))
    return results


# ---- GPU ------------------------------------------------------------------------------------------

def check_gpu(cfg: Config, mem: dict) -> list[Result]:
    import importlib.util

    import torch

    from shifu.device import local_device

    four_bit = cfg.train.quantization == "4bit"
    results = []
    if four_bit and importlib.util.find_spec("bitsandbytes") is None:
        results.append(fail("GPU", "train.quantization is 4bit but bitsandbytes is not installed",
                            "pip install 'shifu[qlora]'"))
    if not torch.cuda.is_available():
        if four_bit:
            return results + [fail("GPU", "no GPU, and train.quantization: 4bit needs CUDA",
                                   "set train.quantization: none to train on CPU, or run on a CUDA machine")]
        return results + [Result("GPU", "warn", "no GPU: training runs on CPU")]
    dev = local_device()
    free, total = torch.cuda.mem_get_info(dev)
    name = torch.cuda.get_device_name(dev)
    need = mem.get("total")
    if need is None:
        return results + [ok("GPU", f"{name}, {total / 1024**3:.0f} GiB ({mem.get('note', 'no estimate')})")]
    line = f"{name}: ~{need} GiB needed for training (shifu estimate), {total / 1024**3:.1f} GiB in all, " \
           f"{free / 1024**3:.1f} GiB free"
    if need * 1024**3 > total:
        smaller = "lower batch_size or max_length, or turn on gradient_checkpointing"
        return results + [fail("GPU", line, smaller if four_bit else f"set train.quantization: 4bit, or {smaller}")]
    if need * 1024**3 > free:
        return results + [Result("GPU", "warn", line + ": other processes hold the rest")]
    return results + [ok("GPU", line)]


# ---- all of it ------------------------------------------------------------------------------------

def _crashed(name: str, err: Exception) -> list[Result]:
    if isinstance(err, UserError):
        return [fail(name, str(err))]
    return [fail(name, f"the check itself failed: {type(err).__name__}: {err}")]


def _guarded(name: str, fn: Callable[[], list[Result]]) -> list[Result]:
    """A check that breaks is one failed line, never the end of the other checks."""
    try:
        return fn()
    except Exception as err:
        return _crashed(name, err)


def _memory(cfg: Config, student_bytes: int | None) -> dict:
    """`shifu estimate`'s memory figure, where something needs it: a GPU to hold it against, or a
    student whose size only its config tells (a hub name). On CPU with a local folder its seconds
    are saved."""
    import torch

    if student_bytes is not None and not torch.cuda.is_available():
        return {"note": "no memory estimate needed here"}
    from shifu.estimate import memory_estimate

    try:
        return memory_estimate(cfg)
    except Exception as err:  # the GPU line says so; the other checks go on
        return {"note": f"no memory estimate ({type(err).__name__}: {str(err)[:120]})"}


def run_check(cfg: Config) -> list[Result]:
    from shifu.probe import check_distill, check_key, check_teacher  # here: probe.py imports this module

    try:
        results, input_bytes = check_inputs(cfg)
    except Exception as err:
        results, input_bytes = _crashed("input", err), 0
    results += _guarded("API key", lambda: check_key(cfg))
    results += _guarded("teacher", lambda: check_teacher(cfg)) + check_distill(cfg)
    try:
        student, student_bytes = check_model(cfg.model_name, "model_name", cfg.trust_remote_code, "student")
    except Exception as err:
        student, student_bytes = _crashed("student", err), None
    results += student
    if cfg.distill.source == "local" and cfg.distill.local_teacher:
        results += _guarded("white-box teacher", lambda: check_model(
            cfg.distill.local_teacher, "distill.local_teacher", cfg.teacher.trust_remote_code, "white-box teacher")[0])
    results += _guarded("folders", lambda: check_folders(cfg))
    mem = _memory(cfg, student_bytes)
    if student_bytes is None:
        student_bytes = int(_params(mem.get("params")) * 2)  # bf16, as the merged model is saved
    # LoRA's share of the weights where the estimate did not count it: ~1% of the parameters at r=16
    lora = _params(mem.get("lora_params")) or student_bytes / 2 * 0.01 * cfg.lora.r / 16
    needs = disk_needs(cfg, input_bytes, student_bytes, lora)
    results += _guarded("disk", lambda: check_disk(cfg, needs))
    results += _guarded("GPU", lambda: check_gpu(cfg, mem))
    return results


def check_file(path: str, overrides: list[str] | None = None) -> list[Result]:
    cfg, results = check_config_file(path, overrides)
    return results + (run_check(cfg) if cfg is not None else [])


_MARKS = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[bold red]✗[/]", "skip": "[dim]-[/]"}


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if r.status == "fail"]


def print_check(results: list[Result]) -> None:
    from rich.markup import escape

    from shifu.progress import console

    for r in results:
        fix = f" [dim]->[/] {escape(r.fix)}" if r.fix else ""
        console.print(f"{_MARKS[r.status]} {escape(r.name)}: {escape(r.detail)}{fix}", highlight=False,
                      soft_wrap=True)


def preflight(cfg: Config) -> None:
    """What `shifu run` calls first: print the checks, stop with one line if any failed."""
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank runs; rank 0 checks for all
        return
    results = run_check(cfg)
    print_check(results)
    bad = failures(results)
    if bad:
        raise UserError(f"{len(bad)} preflight check(s) failed (above); fix them, or pass --skip-check")
