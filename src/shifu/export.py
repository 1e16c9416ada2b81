"""Export the merged student to GGUF for llama.cpp and Ollama, and prove the export answers alike.

    shifu export configs/demo.yaml --gguf --quant q4_k_m     # writes <output_dir>_gguf/
    python -m shifu.export --fetch-converter                  # once: llama.cpp's converter (`make export-tools`)

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, taken from the llama-cpp-python sdist
that vendors it (the same llama.cpp the bindings run), fetched once from PyPI into
$SHIFU_CACHE/llama.cpp-<version>; nothing is downloaded at export time. f16 and q8_0 come straight
from the converter; q4_k_m is quantised from f16 by llama.cpp's `llama_model_quantize` through
llama-cpp-python. The converter carries the tokenizer's chat template and end token into the GGUF
metadata; the export checks they arrived, writes an Ollama `Modelfile` whose TEMPLATE renders
exactly what the chat template renders (checked), with a `stop` for every end token, and then
compares greedy tokens from llama.cpp on the GGUF with transformers on the merged folder.

Output folder:
    model-<quant>.gguf   Modelfile   export.json (metadata and the agreement figures)
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from shifu.config import Config
from shifu.errors import UserError
from shifu.files import atomic_path, write_json

log = logging.getLogger("shifu")
LLAMA_CPP_PYTHON = "0.3.36"  # the Makefile compiles this version; its sdist vendors the converter
QUANTS = ("f16", "q8_0", "q4_k_m")
CHECK_PROMPTS = ["孔乙己是谁？", "用一句话介绍你自己。", "What is distillation in machine learning?",
                 "Write a haiku about tea."]
# Only these parts of the 76 MB sdist are needed to convert.
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "gguf-py/pyproject.toml")

# Run the converter as a script, optionally telling it the pre-tokenizer of a tokenizer it does not
# recognise (its hash table knows released models only; the agreement check then proves the choice).
_BOOT = """
import runpy, sys
root, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [root, root + '/gguf-py']
if pre:
    from conversion import base
    known = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return pre
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [root + '/convert_hf_to_gguf.py'] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def cache_dir() -> Path:
    return Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu"))


def converter_dir() -> Path:
    """llama.cpp's converter: $SHIFU_LLAMA_CPP (a llama.cpp checkout) or the unpacked sdist in the cache."""
    return Path(os.environ.get("SHIFU_LLAMA_CPP") or cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}")


def find_converter() -> Path:
    root = converter_dir()
    if not (root / "convert_hf_to_gguf.py").exists():
        raise UserError(f"{root}: llama.cpp's converter is not there; run `make export-tools` "
                        "(python -m shifu.export --fetch-converter) once, or set SHIFU_LLAMA_CPP to a llama.cpp checkout")
    return root


def unpack_converter(sdist: Path, dest: Path) -> Path:
    """Extract the converter, its `conversion` package and its matching gguf-py from the sdist."""
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/vendor/llama.cpp/", 1)[-1] if "/vendor/llama.cpp/" in member.name else None
            if rel and member.isfile() and rel.startswith(_KEEP):
                member.name = rel
                tar.extract(member, tmp, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").exists():
        raise UserError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside; is it the llama-cpp-python sdist?")
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def fetch_converter() -> Path:
    """The setup step: pip downloads the sdist (PyPI, pip's cache), the converter is unpacked from it."""
    dest = converter_dir()
    if (dest / "convert_hf_to_gguf.py").exists():
        return dest
    wheels = cache_dir() / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "-d", str(wheels), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
    subprocess.run(cmd, check=True)
    return unpack_converter(wheels / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz", dest)


def convert(model_dir: Path, out: Path, outtype: str, pre_tokenizer: str | None, log_path: Path) -> Path:
    root = find_converter()
    cmd = [sys.executable, "-c", _BOOT, str(root), pre_tokenizer or "", str(model_dir), "--outfile", str(out),
           "--outtype", outtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it was written with
    with open(log_path, "w") as logf:
        code = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        hint = "; pass --pre-tokenizer NAME (e.g. qwen2, gpt-2)" if "pre-tokenizer was not recognized" in tail[0] else ""
        raise UserError(f"llama.cpp's converter failed on {model_dir}: {tail[0][:200]}{hint}; see {log_path}")
    return out


def quantize(src: Path, dst: Path, quant: str) -> Path:
    """GGUF to GGUF with llama.cpp's quantiser, through llama-cpp-python's C API (no separate binary)."""
    import ctypes

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if code != 0:
        raise UserError(f"llama.cpp could not quantise {src} to {quant} (code {code})")
    return dst


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llama-cpp-python is not installed; `make .venv/.demo-installed` compiles it "
                        "(pip install 'llama-cpp-python[server]==0.3.36')") from None
    return llama_cpp


def gguf_metadata(path: Path) -> dict:
    """The fields a chat needs, read back from the file: architecture, template, end and pre-tokenizer."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    wanted = {"general.architecture", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.pre", "general.file_type"}
    out = {}
    for name in wanted:
        field = reader.fields.get(name)
        if field is not None:
            out[name] = field.contents()
    return out


# Ollama ------------------------------------------------------------------------------------------------

CHATML_GO = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
             '<|im_start|>assistant\n')


def _chatml(messages: list[dict]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _default_system(tok) -> str | None:
    """The system message a ChatML template adds when the conversation has none (Qwen's does)."""
    text = tok.apply_chat_template([{"role": "user", "content": "U"}], tokenize=False, add_generation_prompt=True)
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head):text.index("<|im_end|>")]
    return None


def ollama_template(tok) -> tuple[str | None, str | None]:
    """(Go TEMPLATE, default SYSTEM) that render what the chat template renders, or (None, None)
    where this template is not ChatML (Ollama then falls back to the GGUF's own template)."""
    system = _default_system(tok)
    samples = [[{"role": "user", "content": "问"}],
               [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]]
    for messages in samples:
        hf = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = messages if messages[0]["role"] == "system" or system is None else (
            [{"role": "system", "content": system}] + messages)
        if _chatml(full) != hf:
            return None, None
    return CHATML_GO, system


def modelfile(tok, gguf_name: str, end_tokens: list[str]) -> str:
    template, system = ollama_template(tok)
    lines = ["# Made by `shifu export`. Use it: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# TEMPLATE: not ChatML; Ollama reads the chat template from the GGUF's metadata")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{t}"' for t in end_tokens]
    return "\n".join(lines) + "\n"


# Agreement between the GGUF in llama.cpp and the merged folder in transformers -------------------------

def hf_greedy(model, tok, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    from shifu.models import end_token_ids

    x = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=end_token_ids(tok), pad_token_id=tok.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def llama_greedy(llm, prompt_ids: list[int], n: int) -> list[int]:
    llama_cpp = _llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    out = []
    for t in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if llama_cpp.llama_vocab_is_eog(vocab, t) or len(out) >= n:
            break
    return out


def agreement(pairs: list[tuple[list[int], list[int]]]) -> dict:
    """Per prompt, how many leading tokens the two greedy continuations share (same_prefix); exact:
    whole sequences equal; token_agreement: shared prefixes over the transformers tokens."""
    same = []
    for a, b in pairs:
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        same.append(k)
    total = sum(len(a) for a, _ in pairs)
    return {"prompts": len(pairs), "exact": sum(a == b for a, b in pairs),
            "token_agreement": round(sum(same) / max(total, 1), 4), "same_prefix": same}


def check_export(merged: Path, gguf: Path, prompts: list[str], max_new_tokens: int = 24) -> dict:
    """Same prompt tokens, same end tokens, same greedy answers (as near as the quantisation allows)."""
    from shifu.models import end_token_ids, load_causal_lm, load_tokenizer

    llama_cpp = _llama_cpp()
    tok = load_tokenizer(str(merged))
    model = load_causal_lm(str(merged)).eval()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=os.cpu_count() or 1, verbose=False,
                          seed=0, n_gpu_layers=0)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    # Tokens transformers stops on that llama.cpp would not stop on; asked before close() frees the vocab.
    not_eog = [tok.convert_ids_to_tokens(t) for t in end_token_ids(tok) if not llama_cpp.llama_vocab_is_eog(vocab, t)]
    pairs, same_prompt = [], 0
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        same_prompt += llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        pairs.append((hf_greedy(model, tok, ids, max_new_tokens), llama_greedy(llm, ids, max_new_tokens)))
    llm.close()
    return {**agreement(pairs), "prompt_tokens_equal": same_prompt, "end_tokens_not_eog": not_eog,
            "max_new_tokens": max_new_tokens}


# The stage ---------------------------------------------------------------------------------------------

def export_dir(cfg: Config) -> Path:
    return Path(str(Path(cfg.output_dir)) + "_gguf")


def gguf_path(cfg: Config, quant: str) -> Path:
    return export_dir(cfg) / f"model-{quant}.gguf"


def write_gguf(merged: Path, dest: Path, quant: str, pre_tokenizer: str | None) -> Path:
    log_path = dest.parent / "convert.log"
    with atomic_path(dest) as tmp:
        if quant in ("f16", "q8_0"):
            convert(merged, tmp, quant, pre_tokenizer, log_path)
            return dest
        f16 = dest.with_name(f".{dest.stem}.f16.gguf")  # k-quants are made from 16-bit weights
        try:
            convert(merged, f16, "f16", pre_tokenizer, log_path)
            quantize(f16, tmp, quant)
        finally:
            f16.unlink(missing_ok=True)
    return dest


def run_export(cfg: Config, quant: str = "q8_0", check: bool = True, pre_tokenizer: str | None = None) -> dict:
    from shifu.card import write_card
    from shifu.models import end_token_ids, load_tokenizer

    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    merged = cfg.merged_dir
    if not (merged / "config.json").exists():
        raise UserError(f"{merged}: no merged model; run `shifu merge` first")
    t0 = time.time()
    dest = gguf_path(cfg, quant)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(merged, dest, quant, pre_tokenizer)
    dest.chmod(0o644)  # the temporary file was private; Ollama and servers run as other users
    meta = gguf_metadata(dest)
    tok = load_tokenizer(str(merged))
    _check_metadata(meta, tok, dest)
    ends = [tok.convert_ids_to_tokens(i) for i in end_token_ids(tok)]
    (dest.parent / "Modelfile").write_text(modelfile(tok, dest.name, ends), encoding="utf-8")
    write_card(cfg)  # the summary may have gained evaluation figures since merge
    report = {"gguf": str(dest), "quant": quant, "bytes": dest.stat().st_size, "modelfile": str(dest.parent / "Modelfile"),
              "ollama_template": "chatml" if ollama_template(tok)[0] else "from gguf", "end_tokens": ends,
              "pre_tokenizer": meta.get("tokenizer.ggml.pre"), "seconds": round(time.time() - t0, 1)}
    if check:
        report["check"] = check_export(merged, dest, CHECK_PROMPTS)
    write_json(dest.parent / "export.json", report)
    return report


def _check_metadata(meta: dict, tok, path: Path) -> None:
    from shifu.models import end_token_ids

    if meta.get("tokenizer.chat_template") != tok.chat_template:
        raise UserError(f"{path}: the chat template did not reach the GGUF metadata; the export would answer "
                        "with the wrong prompt format (check the merged folder's tokenizer files)")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos not in end_token_ids(tok):
        raise UserError(f"{path}: GGUF end token {eos} is not one of the tokenizer's end tokens {end_token_ids(tok)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--fetch-converter"]:
        print(fetch_converter())
    else:
        sys.exit("usage: python -m shifu.export --fetch-converter")
