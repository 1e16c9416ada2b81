"""Loading models and tokenizers the same way everywhere, and the token facts the other stages need.

    from shifu.models import load_tokenizer, load_causal_lm, end_token_ids
    model = load_causal_lm(name, dtype=torch.bfloat16)     # dtype: shifu.device.placement's
    meta = meta_causal_lm(student_config(name), torch.bfloat16)   # same shapes and dtypes, no memory

`student_config` reads a model's config from its folder, from the configs shipped in
`shifu/model_configs/` for the shipped configs' students (so `shifu estimate` works offline), or
from the hub; with no hub it says so at once instead of retrying for a minute.
"""

from __future__ import annotations

import json
import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from shifu.errors import UserError

# For models whose template ends a turn with one token and whose generations sometimes end with
# another (Qwen: <|im_end|>, sometimes <|endoftext|>), both must stop generation.
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")
FALLBACK_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
                     "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
                     "{% else %}{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}")


def _check_exists(name: str, what: str) -> None:
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().exists():
        raise UserError(f"{what} {name!r}: folder not found; point it at a Hugging Face model folder")


def load_tokenizer(name: str, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    _check_exists(name, "model")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(f"model {name!r}: cannot load its tokenizer ({str(err).splitlines()[0]}); "
                        "give a local folder, or run online for a hub name") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if not tok.chat_template:
        tok.chat_template = FALLBACK_TEMPLATE
    tok.padding_side = padding_side
    return tok


def load_causal_lm(name: str, trust_remote_code: bool = False, dtype=None, quantization_config=None,
                   device_map=None):
    import torch
    from transformers import AutoModelForCausalLM

    _check_exists(name, "model")
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": dtype or torch.float32}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, **kwargs)
    except OSError as err:
        raise UserError(f"model {name!r}: cannot load safetensors weights ({str(err).splitlines()[0]})") from None


SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"


def shipped_config_path(name: str) -> Path | None:
    path = SHIPPED_CONFIGS / (name.replace("/", "--") + ".json")
    return path if path.exists() and not Path(name).expanduser().exists() else None


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 1.0) -> bool:
    """A TCP connect to the hub within a second: huggingface_hub itself retries for over a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import threading

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    reached = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    # in a thread: a DNS lookup with no network can hang well past the socket's timeout
    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(reached)


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def student_config(name: str, trust_remote_code: bool = False):
    """The model's transformers config: its folder, else a shipped config, else the hub if reachable.

    A shipped config may translate module names (`_shifu_module_names`): Qwen-7B-Chat's layout is
    described with a built-in architecture, since its own code comes with its weights."""
    from transformers import AutoConfig

    _check_exists(name, "model")
    shipped = shipped_config_path(name)
    if shipped is not None:
        raw = json.loads(shipped.read_text())
        config = AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_shifu")})
        config.shifu_module_names = raw.get("_shifu_module_names", {})
        return config
    if not is_local(name) and not hub_reachable():
        raise UserError(f"model {name!r}: no folder of that name and the Hugging Face hub is unreachable; "
                        f"download it where there is network (hf download {name} --local-dir DIR) "
                        "and set model_name to DIR")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model {name!r}: cannot read its config ({str(err).splitlines()[0]}); "
                        "point model_name at a local Hugging Face folder") from None


def meta_causal_lm(config, dtype, trust_remote_code: bool = False):
    """The model `load_causal_lm` would load, built on the meta device: real shapes and dtypes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def end_token_ids(tok) -> list[int]:
    vocab = tok.get_vocab()
    ids = [vocab[t] for t in _END_TOKENS if t in vocab]
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.insert(0, tok.eos_token_id)
    return ids


def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible map from bytes to printable characters, used by byte-level BPE vocabularies.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tok) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    text = backend.to_str()
    return '"ByteLevel"' in text


@lru_cache(maxsize=8)
def _table_cached(tok_id: int, tok) -> tuple[bytes, ...]:
    size = max(len(tok), max(tok.get_vocab().values()) + 1)
    pieces = tok.convert_ids_to_tokens(list(range(size)))
    special = set(tok.all_special_tokens)
    out = []
    if _is_byte_level(tok):
        dec = _byte_decoder()
        for p in pieces:
            if p is None:
                out.append(b"")
            elif p in special:
                out.append(p.encode())
            else:
                try:
                    out.append(bytes(dec[c] for c in p))
                except KeyError:  # an added token written in plain text
                    out.append(p.encode())
        return tuple(out)
    for p in pieces:  # SentencePiece style: ▁ for space, <0xNN> for raw bytes
        if p is None:
            out.append(b"")
        elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            out.append(bytes([int(p[3:5], 16)]))
        else:
            out.append(p.replace("\u2581", " ").encode())
    return tuple(out)


def token_bytes_table(tok) -> tuple[bytes, ...]:
    """The raw bytes each token id stands for, so texts can be aligned across tokenizers byte by byte."""
    return _table_cached(id(tok), tok)
