"""Talk to the distilled student in the terminal, token by token as it writes.

    shifu chat configs/demo.yaml                         # the run's student: merged folder, else base + adapter
    shifu chat runs/demo/adapter_merged --prompt "孔乙己是谁？"   # any model folder, one answer, then exit
    shifu chat configs/demo.yaml --compare               # base and trained answer each prompt in turn

The student's own chat template builds the prompt and generation stops on its end tokens
(`shifu.models.end_token_ids`: Qwen ends on <|im_end|> or <|endoftext|>). The model runs where the
device rule puts it (`shifu.device.placement`): a GPU in bf16/fp16 where there is one, else the CPU.
Interactive commands: /reset forgets the conversation, /exit (or Ctrl-D) leaves.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from shifu.errors import UserError


@dataclass
class Speaker:
    """One model the user talks to; `context` switches it on (base = adapter disabled)."""

    label: str
    model: object
    tok: object
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    history: list[dict] = field(default_factory=list)


@dataclass
class Target:
    """What `shifu chat` loads: a trained folder (merged or any HF model), else base + adapter."""

    trained: str
    adapter: str | None
    base: str | None
    precision: str
    system_prompt: str | None
    trust_remote_code: bool = False


def resolve(target: str, overrides: list[str] | None = None) -> Target:
    path = Path(target)
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return _adapter_target(path)
        if not (path / "config.json").exists():
            raise UserError(f"{path}: no config.json; give a model folder or a shifu YAML config")
        return Target(str(path), None, _base_of(path), "auto", None)
    from shifu.config import load_config

    cfg = load_config(target, overrides)
    common = dict(base=cfg.model_name, precision=cfg.train.precision, system_prompt=cfg.train.system_prompt,
                  trust_remote_code=cfg.trust_remote_code)
    if (cfg.merged_dir / "config.json").exists():
        return Target(str(cfg.merged_dir), None, **common)
    if (Path(cfg.output_dir) / "adapter_config.json").exists():
        return Target(cfg.model_name, cfg.output_dir, **common)
    raise UserError(f"{target}: no trained student in {cfg.merged_dir} or {cfg.output_dir}; "
                    "run `shifu train` (and `shifu merge`) first")


def _base_of(folder: Path) -> str | None:
    """The base a merged folder came from, as its shifu_config.yaml records it."""
    import yaml

    saved = folder / "shifu_config.yaml"
    if not saved.exists():
        return None
    return (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("model_name")


def _adapter_target(folder: Path) -> Target:
    import json

    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{folder}/adapter_config.json names no base_model_name_or_path; chat with a config instead")
    return Target(base, str(folder), base, "auto", None)


def load_speakers(t: Target, compare: bool) -> list[Speaker]:
    from shifu.device import placement
    from shifu.models import load_causal_lm, load_tokenizer

    where = placement(t.precision)

    def load(name):
        return load_causal_lm(name, t.trust_remote_code, where.dtype).to(where.device).eval()

    tok = load_tokenizer(t.adapter or t.trained, t.trust_remote_code, padding_side="left")
    if t.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load(t.trained), t.adapter).eval()
        trained = Speaker("trained", model, tok)
        return [Speaker("base", model, tok, model.disable_adapter), trained] if compare else [trained]
    trained = Speaker("trained", load(t.trained), tok)
    if not compare:
        return [trained]
    if not t.base:
        raise UserError(f"{t.trained}: --compare needs the base model; chat with the run's config instead")
    return [Speaker("base", load(t.base), load_tokenizer(t.base, t.trust_remote_code, "left")), trained]


def prompt_ids(tok, messages: list[dict]):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False)


def stream_reply(sp: Speaker, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                 out: TextIO | None = None) -> str:
    """Generate an answer, writing each piece to `out` as soon as it is decoded; return the whole text."""
    import torch
    from transformers import TextIteratorStreamer

    from shifu.models import end_token_ids

    out = out or sys.stdout
    device = next(sp.model.parameters()).device
    enc = {k: v.to(device) for k, v in prompt_ids(sp.tok, messages).items()}
    streamer = TextIteratorStreamer(sp.tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, eos_token_id=end_token_ids(sp.tok),
                  pad_token_id=sp.tok.pad_token_id, streamer=streamer, **sampling)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                sp.model.generate(**kwargs)
        except BaseException as err:  # reported in the caller's thread, not lost in this one
            failure.append(err)
            streamer.end()

    pieces = []
    with sp.context():
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        for piece in streamer:
            pieces.append(piece)
            out.write(piece)
            out.flush()
        thread.join()
    if failure:
        raise failure[0]
    return "".join(pieces)


def answer(speakers: list[Speaker], text: str, system: str | None, max_new_tokens: int, temperature: float,
           out: TextIO | None = None, keep_history: bool = True) -> dict[str, str]:
    out = out or sys.stdout
    replies = {}
    for sp in speakers:
        messages = ([{"role": "system", "content": system}] if system else []) + sp.history + [
            {"role": "user", "content": text}]
        if len(speakers) > 1:
            out.write(f"[{sp.label}] ")
        replies[sp.label] = stream_reply(sp, messages, max_new_tokens, temperature, out)
        out.write("\n")
        if keep_history:
            sp.history += [{"role": "user", "content": text}, {"role": "assistant", "content": replies[sp.label]}]
    return replies


def repl(speakers: list[Speaker], system: str | None, max_new_tokens: int, temperature: float,
         read: Callable[[str], str] = input, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(f"chatting with {', '.join(sp.label for sp in speakers)}; /reset forgets, /exit leaves\n")
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            for sp in speakers:
                sp.history.clear()
            continue
        if text:
            answer(speakers, text, system, max_new_tokens, temperature, out)


def run_chat(target: str, overrides: list[str] | None = None, compare: bool = False, prompt: str | None = None,
             system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0) -> None:
    t = resolve(target, overrides)
    speakers = load_speakers(t, compare)
    system = system if system is not None else t.system_prompt
    if prompt is not None:
        answer(speakers, prompt, system, max_new_tokens, temperature, keep_history=False)
    else:
        repl(speakers, system, max_new_tokens, temperature)
