"""Stage 5: LoRA (or QLoRA) fine-tuning of the student with language-model + distillation loss.

    shifu train configs/demo.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml -m shifu train configs/x.yaml

Reads `jsonl_output_path` (and the held-out `.eval.jsonl`), applies the student's chat template,
and trains on answer tokens only. Per answer token the loss is
    (1 - kd_ratio) * CE + kd_ratio * KD        where the teacher's distribution is known,
    CE                                         elsewhere,
averaged over all answer tokens of the optimizer step, across devices and accumulation steps.
The teacher's distribution comes from the API's stored top-k logprobs, from a local white-box
teacher (top-k written once to disk), or nowhere (plain fine-tuning on the teacher's text).
Each batch is packed into one row with per-example position ids: no padding, and no example
attends to another. Logits are computed only at answer positions. Checkpoints go to
<work_dir>/checkpoints; a rerun after a crash resumes from the last one.
Writes the adapter (safetensors), tokenizer, resolved config, summary and loss curve to output_dir.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from shifu.config import Config, DistillConfig, dump_config
from shifu.device import placement
from shifu.encode import Encoded, encode_examples
from shifu.errors import UserError
from shifu.files import atomic_dir, build_lock, hash_obj, read_json, read_jsonl, write_json
from shifu.losses import chunked_loss_sums, loss_sums
from shifu.models import load_causal_lm, load_tokenizer
from shifu.reasoning import attach_extras
from shifu.targets import build_targets

log = logging.getLogger("shifu")


# ---- data ---------------------------------------------------------------------------------------

class SFTDataset(torch.utils.data.Dataset):
    """Token ids and labels per example, plus the teacher's rows on answer positions when known."""

    def __init__(self, enc: Encoded, targets=None):
        self.enc, self.targets = enc, targets
        self.lengths = [len(x) for x in enc.input_ids]  # for length-grouped batches, without loading items

    def __len__(self) -> int:
        return len(self.enc)

    def __getitem__(self, i: int) -> dict:
        ids = self.enc.input_ids[i].astype(np.int64)
        labels = ids.copy()
        labels[: self.enc.answer_start[i]] = -100
        for a, b in self.enc.masked[i] if self.enc.masked else ():  # a follow-up's second user turn
            labels[a:b] = -100
        item = {"input_ids": ids, "labels": labels}
        if self.targets is not None:
            width = self.targets.width
            kd_ids = np.full((len(ids), width), -1, np.int64)
            kd_lps = np.full((len(ids), width), -np.inf, np.float32)
            rows = self.targets.get(i)
            if rows is not None:
                start = int(self.enc.answer_start[i])
                n = min(len(rows[0]), len(ids) - start)
                kd_ids[start:start + n], kd_lps[start:start + n] = rows[0][:n], rows[1][:n]
            item.update(kd_ids=kd_ids, kd_lps=kd_lps)
        return item


def collate(items: list[dict], packing: bool = True, pad_id: int = 0) -> dict:
    """Packing: one row, positions restarting per example (transformers then masks across examples).
    Without packing: right-padded rows with an attention mask."""
    keys = [k for k in ("input_ids", "labels", "kd_ids", "kd_lps") if k in items[0]]
    fill = {"input_ids": pad_id, "labels": -100, "kd_ids": -1, "kd_lps": -np.inf}
    if packing:
        batch = {k: torch.from_numpy(np.concatenate([it[k] for it in items]))[None] for k in keys}
        batch["position_ids"] = torch.from_numpy(np.concatenate([np.arange(len(it["input_ids"])) for it in items]))[None]
        return batch
    longest = max(len(it["input_ids"]) for it in items)
    batch = {}
    for k in keys:
        rows = []
        for it in items:
            pad = [(0, longest - len(it[k]))] + [(0, 0)] * (it[k].ndim - 1)
            rows.append(np.pad(it[k], pad, constant_values=fill[k]))
        batch[k] = torch.from_numpy(np.stack(rows))
    batch["attention_mask"] = torch.tensor([[1] * len(it["input_ids"]) + [0] * (longest - len(it["input_ids"]))
                                            for it in items])
    return batch


def _mix(*values: int) -> int:
    """A 60-bit seed from several integers, the same in every process and Python version."""
    return int(hash_obj(list(values))[:15], 16)


class EpochSampler(torch.utils.data.Sampler):
    """The order of an epoch from (seed, epoch) alone, drawn from its own generator. The global random
    state, which evaluation and data loading also draw from, cannot move it, so a run resumed at any
    step sees the order an uninterrupted run saw. `epoch()` is read as an epoch's pass begins (the
    Trainer's state, restored on resume). With `lengths`: transformers' length-grouped order (shuffled
    mega-batches of `group` examples, each sorted by length) from the same generator."""

    def __init__(self, n: int, seed: int, epoch, lengths: list[int] | None = None, group: int = 1):
        self.n, self.seed, self.epoch, self.lengths, self.group = n, seed, epoch, lengths, group

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch()))
        if self.lengths is None:
            return iter(torch.randperm(self.n, generator=g).tolist())
        return iter(get_length_grouped_indices(self.lengths, self.group, generator=g))


class StepSeed(TrainerCallback):
    """Reseeds torch (CPU and every GPU) from (seed, optimizer step, rank) as each step begins:
    dropout and every other draw of a step then owe nothing to what ran before it (evaluation,
    data loading, a restart), so a resumed run draws what an uninterrupted one drew."""

    def on_step_begin(self, args, state, control, **kwargs):
        torch.manual_seed(_mix(args.seed, state.global_step, args.process_index))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # what each rank holds once the launcher has wrapped the model: with FSDP, its shards only
        log.info("rank %d holds %d parameter bytes", args.process_index, local_parameter_bytes(model))


def local_parameter_bytes(model) -> int:
    """Bytes of parameters this process holds; a sharded (DTensor) parameter counts its local shard."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local)


# ---- the trainer --------------------------------------------------------------------------------

class DistillationTrainer(Trainer):
    """A Trainer whose loss is token-averaged CE mixed with a distillation term (shifu.losses)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, distill: DistillConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.model_accepts_loss_kwargs = True  # makes the Trainer count answer tokens per optimizer step
        self._parts = torch.zeros(4, dtype=torch.float64)  # ce sum, kd sum, tokens, tokens with teacher
        self.add_callback(StepSeed())

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # the epoch a pass belongs to: state.epoch is fractional mid-epoch and whole at an epoch's end
        epoch = lambda: int((self.state.epoch or 0) + 1e-6)  # noqa: E731
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(ds, "lengths"):
            # group by the global batch, so N processes see the same examples per step as one
            size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return EpochSampler(len(ds), seed, epoch, ds.lengths, size)
        if self.args.train_sampling_strategy == "random":
            return EpochSampler(len(ds), seed, epoch)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        kd_ids, kd_lps = inputs.pop("kd_ids", None), inputs.pop("kd_lps", None)
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100  # positions whose next token is an answer token
        targets = labels[:, 1:][keep[:, :-1]]
        if kd_ids is not None:
            kd_ids, kd_lps = kd_ids[:, 1:][keep[:, :-1]], kd_lps[:, 1:][keep[:, :-1]]
        head = self._chunkable_head(model)
        if head is not None:
            # The model returns its last hidden state and no logits; the head runs chunk by chunk,
            # so full-vocabulary logits of the whole batch never exist at once (shifu.losses).
            outputs = model(**inputs, logits_to_keep=torch.zeros_like(keep), output_hidden_states=-1, use_cache=False)
            sums = chunked_loss_sums(outputs.hidden_states[-1][keep], head, targets, kd_ids, kd_lps, self.distill)
        else:  # FSDP shards the head's weight outside the model's forward: logits from the model itself
            outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
            sums = loss_sums(outputs.logits.reshape(-1, outputs.logits.shape[-1]), targets, kd_ids, kd_lps, self.distill)
        total = sums[0]
        if num_items_in_batch is not None and model.training:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients; undo it for a global token mean
        else:
            loss = total / max(1, len(targets))
        if model.training:
            ce_sum, kd_sum, n_kd = sums[1:].detach().tolist()
            self._parts += torch.tensor([ce_sum, kd_sum, len(targets), n_kd], dtype=torch.float64)
        return (loss, outputs) if return_outputs else loss

    def _chunkable_head(self, model):
        """The output head to run in chunks, or None where the logits must come from the model itself."""
        if self.is_fsdp_enabled:
            return None
        inner = self.accelerator.unwrap_model(model)
        config = getattr(inner, "config", None)
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            return None  # models that transform logits after the head
        return inner.get_output_embeddings()

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._parts[2] > 0:
            ce, kd, n, n_kd = self._parts.tolist()
            # kd_share: answer tokens of this window that had teacher distributions; examples taken from
            # the text itself (teacher_data_ratio < 1) have none. The summary's kd_coverage counts teacher examples.
            logs.update(ce=round(ce / n, 4), kd_share=round(n_kd / n, 4))
            if n_kd:
                logs["kd"] = round(kd / n_kd, 4)
            self._parts.zero_()
        super().log(logs, *args, **kwargs)


# ---- the stage ----------------------------------------------------------------------------------

def precision(cfg: Config) -> dict:
    """The Trainer's bf16/fp16 flags: autocast in the dtype the base weights were loaded in."""
    return placement(cfg.train.precision).trainer_flags


def load_student(cfg: Config):
    """The student's base weights in the dtype of shifu.device's rule (bf16 on most GPUs, not fp32),
    LoRA adapters on top in fp32 (peft's default). QLoRA: NF4 weights on this process's GPU."""
    from peft import LoraConfig, get_peft_model

    where = placement(cfg.train.precision)
    quant, device_map = None, None
    if cfg.train.quantization == "4bit":
        if where.device.type != "cuda":
            raise UserError("train.quantization=4bit (QLoRA) needs a CUDA GPU and bitsandbytes; set it to none on CPU")
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=where.dtype)
        device_map = where.device_map  # bitsandbytes quantizes as weights reach the GPU
    model = load_causal_lm(cfg.model_name, cfg.trust_remote_code, where.dtype, quant, device_map)
    # No prepare_model_for_kbit_training: it casts embeddings, norms and the output head to fp32,
    # 4.4 GB more for a 7B student; in bf16 they are stable enough, and peft freezes them anyway.
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def use_packing(cfg: Config, model) -> bool:
    """Packing saves padding only where the attention kernel skips the blocks between examples
    (flash-attention's variable-length path). With sdpa or eager attention a packed row of n
    examples costs n times the attention of padded rows, so those get length-grouped padding."""
    if cfg.train.packing != "auto":
        return bool(cfg.train.packing)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "") or ""
    return impl.startswith("flash_attention")


def training_args(cfg: Config, has_eval: bool, packing: bool | None = None) -> TrainingArguments:
    t = cfg.train
    packing = t.packing is True if packing is None else packing
    eval_strategy = ("steps" if t.eval_steps else "epoch") if has_eval else "no"
    return TrainingArguments(
        output_dir=str(cfg.work / "checkpoints"), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_epochs, max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio if t.warmup_steps is None else t.warmup_steps, lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy=eval_strategy, eval_steps=t.eval_steps,
        report_to=[r for r in t.report_to if r != "none"], seed=t.seed, data_seed=t.seed,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True,
        train_sampling_strategy="random" if packing else "group_by_length",
        average_tokens_across_devices=True, dataloader_num_workers=0,
        include_num_input_tokens_seen="all" if packing else "non_padding",
        disable_tqdm=not os.isatty(2), use_cpu=placement(cfg.train.precision).device.type == "cpu", **precision(cfg))


def read_split(cfg: Config) -> tuple[list[dict], list[dict]]:
    train_path = Path(cfg.jsonl_output_path)
    if not train_path.exists():
        raise UserError(f"{train_path}: no training data; run `shifu teach` and `shifu dataset` first")
    train = list(read_jsonl(train_path))
    held = list(read_jsonl(cfg.eval_jsonl_path)) if cfg.eval_jsonl_path.exists() else []
    if not train:
        raise UserError(f"{train_path}: empty; no examples to train on")
    return train, held


def _checkpoint_to_resume(cfg: Config, fingerprint: str) -> str | None:
    folder = cfg.work / "checkpoints"
    stamp = folder / "shifu_fingerprint.json"
    with build_lock(folder):  # every rank comes here; one clears stale checkpoints, none while another reads
        if folder.exists() and read_json(stamp, {}).get("fingerprint") != fingerprint:
            shutil.rmtree(folder)  # checkpoints of other data or settings must not be resumed
        folder.mkdir(parents=True, exist_ok=True)
        write_json(stamp, {"fingerprint": fingerprint})
    done = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    done = [p for p in done if _complete(p)]
    return str(done[-1]) if done else None


def check_launch(trainer) -> None:
    """A launch that asks for FSDP or DeepSpeed gets it, or stops: accelerate would otherwise run CPU
    processes as plain DDP without a word (its MULTI_CPU mode has neither), so nothing is sharded."""
    for name, env, enabled in (("FSDP", "ACCELERATE_USE_FSDP", trainer.is_fsdp_enabled),
                               ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", trainer.is_deepspeed_enabled)):
        if os.environ.get(env, "false").lower() == "true" and not enabled:
            raise UserError(f"the accelerate config asks for {name}, which accelerate runs only on GPUs; on CPU "
                            "launch with configs/accelerate/ddp.yaml (--num_processes N) instead")


def _complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last; a kill during a save leaves it missing or torn."""
    import json

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def run_train(cfg: Config) -> dict:
    from shifu.plots import loss_curve

    train, held = read_split(cfg)
    tok = load_tokenizer(cfg.model_name, cfg.trust_remote_code)
    cache = cfg.work / "cache"
    # a thinking teacher's reasoning joins the target (shifu.reasoning: the template's way, or train.reasoning),
    # and a follow-up its first exchange (tasks.follow_ups)
    train, held = attach_extras(cfg, train), attach_extras(cfg, held)
    thinking = (cfg.train.reasoning, cfg.train.reasoning_tag)
    enc_train = encode_examples(tok, train, cfg.max_length, cfg.train.system_prompt, cache, thinking)
    enc_eval = encode_examples(tok, held, cfg.max_length, cfg.train.system_prompt, cache, thinking) if held else None
    targets, kd_info = build_targets(cfg, tok, train, enc_train)
    set_seed(cfg.train.seed)  # LoRA's initial weights are random: same seed, same start
    model = load_student(cfg)
    fingerprint = hash_obj([cfg.model_dump(exclude={"eval", "teacher"}), str(Path(cfg.jsonl_output_path).stat().st_mtime_ns)])
    resume = _checkpoint_to_resume(cfg, fingerprint)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(cfg.work / "tensorboard"))
    packing = use_packing(cfg, model)
    trainer = DistillationTrainer(
        model=model, args=training_args(cfg, enc_eval is not None, packing), train_dataset=SFTDataset(enc_train, targets),
        eval_dataset=SFTDataset(enc_eval) if enc_eval is not None else None, distill=cfg.distill,
        data_collator=lambda items: collate(items, packing, tok.pad_token_id))
    check_launch(trainer)
    if resume:
        log.info("resuming from %s", resume)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - t0
    tokens = trainer.state.num_input_tokens_seen  # packed batches hold no padding: these are real tokens
    summary = {"train_examples": len(train), "eval_examples": len(held), "steps": result.global_step,
               "train_loss": round(result.training_loss, 4), "seconds": round(seconds, 1),
               "truncated_examples": enc_train.truncated, "resumed_from": resume, "packing": packing, **kd_info,
               "tokens_per_second": round(tokens / seconds, 1) if tokens and not resume else None}
    if trainer.is_world_process_zero():
        with atomic_dir(cfg.output_dir) as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "shifu_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
            write_json(tmp / "train_summary.json", summary)
            loss_curve(trainer.state.log_history, tmp / "loss_curve.png")
    return summary
