"""One typed configuration for every stage, loaded from YAML and overridable from the command line.

    from shifu.config import load_config
    cfg = load_config("configs/demo.yaml", overrides=["teacher.max_concurrency=32"])

Every field carries a one-line description and a checked range. Unknown keys and wrong types are
rejected with a message that names the key. The top-level field names follow the original
distillation guide (raw_data_path, model_name, batch_size, ...) so its users find them where they
expect; everything shifu adds lives in a section. API keys are never fields: `teacher.api_key_env`
names the environment variable that holds the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shifu.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    encoding: str | None = Field(None, description="Force this text encoding (e.g. gb18030); None detects it per file.")
    text_field: str = Field("text", description="Field that holds the text in .jsonl inputs.")
    chunk_unit: Literal["chars", "tokens"] = Field("chars", description="Unit of chunk_size: characters or student tokens.")
    chunk_overlap: int = Field(0, ge=0, description="Units of trailing context repeated at the start of the next chunk.")
    min_chunk_chars: int = Field(20, ge=1, description="Chunks shorter than this many characters are dropped.")
    max_chunks: int | None = Field(None, ge=1, description="Stop reading after this many chunks: a cheap trial run (with `shifu estimate`) before the whole corpus.")
    dedup_threshold: float = Field(0.85, gt=0, le=1, description="Estimated Jaccard similarity above which a chunk counts as a near-duplicate; 1 keeps only exact-duplicate removal.")


class TemplateConfig(Section):
    """A task kind a user adds or overrides without touching code. The prompt is instruction + blank line + input."""

    category: Literal["问答", "文章生成"] = Field(..., description="Dataset category of the examples this kind makes.")
    instruction: str = Field(..., description="Instruction text; {n} (questions wanted) and {question} are filled in.")
    input: str = Field("{chunk}", description="Input text; {chunk} is the chunk.")
    parse: Literal["text", "json_qa"] = Field("text", description="text: the answer is the output; json_qa: the answer is a JSON list of questions, each then answered with qa_answer.")


class TasksConfig(Section):
    qa_per_chunk: int = Field(2, ge=1, le=20, description="Questions the teacher proposes per chunk.")
    qa_mode: Literal["open", "closed", "both"] = Field("open", description="open: the instruction holds the chunk; closed: only a self-contained question; both: one of each.")
    language: Literal["auto", "zh", "en"] = Field("auto", description="Template language; auto picks it from each chunk.")
    continuation_chars: int = Field(200, ge=10, description="Length of the source text used as target for continuations made without the teacher.")
    seed: int = Field(42, description="Seed for the teacher/text split; the same seed gives the same tasks.")
    custom: dict[str, TemplateConfig] = Field(default_factory=dict, description="Extra task kinds by name: a template plus how its output is parsed.")
    trim_truncated: bool = Field(False, description="Keep continuations (文章生成) cut off at teacher.max_tokens, trimmed to their last full sentence; cut-off answers to questions are always rejected.")
    min_answer_chars: int = Field(4, ge=0, description="Teacher answers shorter than this are rejected.")
    max_copy_ratio: float = Field(0.9, gt=0, le=1, description="An answer whose longest run copied from the chunk covers more than this share is rejected.")
    near_dup_threshold: float = Field(0.9, gt=0, le=1, description="Answers more similar than this to an earlier answer are rejected as near-duplicates.")
    follow_ups: bool = Field(False, description="After each open-book answer, have the teacher ask one follow-up question on the same passage and answer it with the first exchange in context: a two-turn conversation, trained on both answers.")


class Price(Section):
    input_cache_hit: float = Field(..., ge=0, description="Price per million input tokens served from the provider's cache.")
    input_cache_miss: float = Field(..., ge=0, description="Price per million input tokens not in the cache.")
    output: float = Field(..., ge=0, description="Price per million output tokens.")
    peak_input_cache_hit: float | None = Field(None, ge=0, description="Peak-hour price; None means the off-peak price applies all day.")
    peak_input_cache_miss: float | None = Field(None, ge=0, description="Peak-hour input price on a cache miss.")
    peak_output: float | None = Field(None, ge=0, description="Peak-hour output price.")


def _default_prices() -> dict[str, Price]:
    # DeepSeek's published rates (USD per 1M tokens) as of 2026-10; check api-docs.deepseek.com before budgeting.
    return {
        "deepseek-flash": Price(input_cache_hit=0.003, input_cache_miss=0.15, output=0.6,
                                peak_input_cache_hit=0.006, peak_input_cache_miss=0.30, peak_output=1.2),
        "deepseek-v4-pro": Price(input_cache_hit=0.022, input_cache_miss=0.66, output=1.98,
                                 peak_input_cache_hit=0.044, peak_input_cache_miss=1.32, peak_output=3.96),
    }


class DatasetConfig(Section):
    formats: list[Literal["messages", "sharegpt"]] = Field(default_factory=list, description="Extra files beside the Alpaca JSONL: messages (OpenAI-style, reasoning as reasoning_content), sharegpt; with dataset_info.json for LLaMA-Factory.")


class TeacherConfig(Section):
    kind: Literal["openai", "local"] = Field("openai", description="openai: any OpenAI-compatible chat-completions server; local: an in-process Hugging Face model.")
    base_url: str = Field("https://api.deepseek.com", description="Server root; /chat/completions is appended (a trailing /v1 is kept).")
    model: str = Field("deepseek-flash", description="Model name sent to the server, or for kind=local the Hugging Face folder.")
    api_key_env: str = Field("DEEPSEEK_API_KEY", description="Environment variable that holds the API key; the key itself never goes in a file.")
    extra_body: dict[str, Any] = Field(default_factory=lambda: {"thinking": {"type": "disabled"}}, description="Extra JSON merged into every request (DeepSeek: non-thinking mode).")
    max_concurrency: int = Field(64, ge=1, le=10000, description="Requests in flight at once; DeepSeek allows 2500 per account on deepseek-flash.")
    requests_per_minute: float | None = Field(None, gt=0, description="Optional cap on requests started per minute.")
    tokens_per_minute: float | None = Field(None, gt=0, description="Optional cap on prompt+completion tokens per minute (estimated before, corrected after).")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature of the teacher.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling; None leaves the server default.")
    max_tokens: int = Field(512, ge=1, le=65536, description="Most tokens per teacher answer; answers cut off here are marked truncated.")
    expected_output_ratio: float = Field(0.6, gt=0, le=1, description="Share of max_tokens an answer is expected to use, for `shifu estimate`.")
    top_logprobs: int = Field(0, ge=0, le=20, description="Alternatives per answer token to request and store for token-level distillation (0: none).")
    json_mode: bool = Field(True, description="Ask for response_format json_object when proposing questions.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds, connection included.")
    max_attempts: int = Field(6, ge=1, le=100, description="Attempts per request before it is recorded as failed (retried on the next run).")
    backoff_base_s: float = Field(1.0, ge=0, description="First retry delay; doubles per attempt, with full jitter.")
    backoff_max_s: float = Field(60.0, ge=0, description="Longest retry delay, Retry-After included.")
    max_cost: float | None = Field(None, gt=0, description="Stop scheduling requests before the spend would exceed this (price-table currency).")
    allow_partial: bool = Field(False, description="Let a teach run that ends with failed or unsent requests succeed (the summary marks it partial); false stops it with a non-zero exit.")
    prices: dict[str, Price] = Field(default_factory=_default_prices, description="Price per model name, per million tokens.")
    peak_pricing: bool = Field(True, description="Use peak rates on weekdays 01:00-04:00 and 06:00-10:00 UTC where a peak price is given.")
    local_batch_size: int = Field(4, ge=1, description="Prompts generated together by the local teacher.")
    trust_remote_code: bool = Field(False, description="Let the local teacher run code shipped with its weights.")
    thinking: bool = Field(False, description="Ask the teacher to think first (DeepSeek: thinking enabled in place of extra_body's disabled switch) and store its reasoning with the answer.")
    expected_reasoning_tokens: int = Field(1000, ge=0, le=65536, description="Reasoning tokens an answer is expected to take when thinking is on (billed as output), for `shifu estimate`.")


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Module names to adapt, or all-linear for every linear layer but the output head.")


class DistillConfig(Section):
    kd_ratio: float = Field(0.5, ge=0, le=1, description="loss = (1 - kd_ratio) * CE + kd_ratio * KD on tokens that have a teacher distribution. At 0.5 (bench/quality.py, docs/BENCHMARKS.md): held-out KL to the teacher 6% (zh) and 1% (en) below fine-tuning alone's for Qwen 0.5B after 12 steps, 4% for SmolLM2-135M (other tokenizer) after 48, NLL unchanged or 1% worse; 0.9 lowers KL further in zh but costs 2.6% NLL in en.")
    temperature: float = Field(1.0, gt=0, description="Softening temperature for both distributions; KD is scaled by T^2. T=2 raised held-out KL (at T=1) by 0.18-0.22 for Qwen 0.5B and NLL by up to 0.10 against T=1 (bench/quality.py).")
    variant: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"] = Field("forward_kl", description="Divergence between teacher and student. With reverse_kl, held-out KL to the teacher was 0.433 (zh) and 0.403 (en) against forward_kl's 0.410 and 0.392 (bench/quality.py, Qwen 0.5B, 12 steps).")
    beta: float = Field(0.5, gt=0, lt=1, description="Teacher weight in the generalized JSD mixture.")
    skew_alpha: float = Field(0.1, gt=0, lt=1, description="Mixing weight of the skew KL variants.")
    source: Literal["auto", "api", "local", "none"] = Field("auto", description="Teacher distribution: api logprobs, a local white-box model, none (sequence-level), or auto (api when logprobs exist).")
    local_teacher: str | None = Field(None, description="HF folder of a white-box teacher sharing the student's tokenizer (source=local).")
    local_top_k: int = Field(32, ge=1, le=1024, description="Top-k entries of the local teacher stored on disk per token.")


class TrainConfig(Section):
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 runs num_epochs.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps with linear warm-up.")
    warmup_steps: int | None = Field(None, ge=0, le=1_000_000, description="Optimizer steps of linear warm-up, overriding warmup_ratio (which rounds up: any ratio costs a short run its first step, taken at learning rate 0).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (linear, cosine, constant, ...).")
    packing: bool | Literal["auto"] = Field("auto", description="true: each batch in one row with per-example positions (no padding, no cross-attention); false: padded rows grouped by length; auto: packing only with a flash-attention kernel, which skips the blocks between examples.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Dtype of the base weights (shifu.device): auto is bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU; bf16 also runs on CPU.")
    quantization: Literal["none", "4bit"] = Field("none", description="4bit loads the student in NF4 for QLoRA (bitsandbytes, CUDA only).")
    save_steps: int = Field(50, ge=1, description="Checkpoint every this many optimizer steps (resume point).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    logging_steps: int = Field(5, ge=1, description="Log the loss every this many steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate on the held-out split every this many steps; None evaluates once per epoch.")
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"], description="Trackers for the Trainer (tensorboard, wandb, none).")
    seed: int = Field(42, description="Seed for weights of new layers, data order and dropout.")
    system_prompt: str | None = Field(None, description="System message for the chat template; None keeps the template's own default.")
    reasoning: Literal["include", "drop"] = Field("include", description="Teacher reasoning in the target of a student whose chat template does not render it: include (inside reasoning_tag) or drop (answer alone).")
    reasoning_tag: str = Field("think", pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,31}$", description="Tag that wraps included reasoning: <tag>...</tag> before the answer.")


class EvalConfig(Section):
    eval_ratio: float = Field(0.1, ge=0, lt=1, description="Share of chunks held out; their examples never reach training.")
    num_samples: int = Field(3, ge=0, description="Held-out prompts answered by base, trained and teacher side by side.")
    max_new_tokens: int = Field(128, ge=1, description="Tokens generated per sample.")
    max_examples: int = Field(64, ge=1, description="Held-out examples scored for loss and perplexity.")
    generate_examples: int = Field(32, ge=0, le=10000, description="Held-out prompts answered by base and trained student for the judge and ROUGE-L/BLEU against the teacher.")
    judge: bool = Field(True, description="Have the judge compare answers pairwise (trained vs base, trained vs teacher, closed-book knowledge).")
    judge_model: str | None = Field(None, description="Judge model name; None uses teacher.model.")
    judge_base_url: str | None = Field(None, description="Judge server (OpenAI-compatible); None uses teacher.base_url and its key.")
    judge_max_tokens: int = Field(16, ge=1, le=4096, description="Most tokens per verdict; the judge is asked for one marker.")
    knowledge_questions: int = Field(16, ge=0, le=10000, description="Closed-book questions about trained chunks, answered without the passage and judged against it.")
    batch_size: int | None = Field(None, ge=1, le=1024, description="Prompts generated or scored together; None: 16 on GPU, 4 on CPU.")
    bootstrap_samples: int = Field(1000, ge=100, le=100000, description="Bootstrap resamples for every confidence interval.")
    seed: int = Field(0, description="Seed for the bootstrap and the choice of knowledge questions.")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks run on base and merged student (needs the lm-eval extra).")
    lm_eval_include: str | None = Field(None, description="Folder of extra lm-eval YAML tasks (offline or custom benchmarks).")
    lm_eval_limit: int | None = Field(None, ge=1, description="Most questions per lm-eval task; None runs them all.")


class Config(Section):
    raw_data_path: str = Field("data.txt", description="Input text: a file, a folder or a glob (.txt, .md, .jsonl; .pdf/.docx with the docs extra).")
    model_name: str = Field("Qwen/Qwen2.5-7B-Instruct", description="Student: a Hugging Face causal LM folder or hub name (hub only when online).")
    trust_remote_code: bool = Field(False, description="Let the student run code shipped with its weights (Qwen-7B-Chat needs it).")
    output_dir: str = Field("./distilled-model", description="Where the LoRA adapter is saved; the merged model goes to <output_dir>_merged.")
    work_dir: str = Field("./shifu-work", description="Intermediate files: chunks, tasks, teacher store, manifest, reports.")
    jsonl_output_path: str = Field("distillation_data.jsonl", description="Training examples, one JSON object a line; held-out ones go to <stem>.eval.jsonl.")
    batch_size: int = Field(4, ge=1, le=4096, description="Examples per device per micro-batch.")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate. Against 2e-4 for LoRA r8 over 12 steps (bench/quality.py): better held-out KL for Qwen 0.5B (zh), worse on every measure for SmolLM2-135M.")
    num_epochs: float = Field(10, gt=0, description="Passes over the training examples.")
    max_length: int = Field(512, ge=16, description="Most tokens per example (prompt + answer); longer examples lose prompt first.")
    chunk_size: int = Field(500, ge=16, description="Largest chunk, in chunk_unit.")
    enable_qa: bool = Field(True, description="Make question-answering (问答) tasks.")
    enable_article: bool = Field(True, description="Make continuation (文章生成) tasks.")
    teacher_data_ratio: float = Field(1.0, ge=0, le=1, description="Share of tasks sent to the teacher; the rest become continuation examples from the text itself.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass to save memory.")
    data: DataConfig = Field(default_factory=DataConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Dataset files written beside the Alpaca JSONL for other training tools.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        # ~ and $VARS in paths, so shipped configs can point into the user's cache
        for name in ("raw_data_path", "model_name", "output_dir", "work_dir", "jsonl_output_path"):
            value = getattr(self, name)
            if "~" in value or "$" in value:
                object.__setattr__(self, name, os.path.expandvars(os.path.expanduser(value)))
        problems = self._cross_field_problems()
        if problems:  # all of them at once, one line each (see _format_errors)
            raise ValueError("\n".join(problems))
        return self

    def _cross_field_problems(self) -> list[str]:
        """Checks that span fields, all made here, before any stage starts, rather than inside a stage."""
        out = []
        if not (self.enable_qa or self.enable_article or self.tasks.custom):
            out.append("enable_qa and enable_article are both false and no tasks.custom kind is set: nothing to do")
        if self.data.chunk_overlap >= self.chunk_size:
            out.append("data.chunk_overlap must be smaller than chunk_size")
        if self.distill.source == "local" and not self.distill.local_teacher:
            out.append("distill.source is local but distill.local_teacher is not set")
        tc = self.teacher
        if tc.thinking and tc.kind != "openai":
            out.append("teacher.thinking needs teacher.kind openai (a server that returns reasoning_content); "
                       "set teacher.thinking to false for a local teacher")
        if tc.max_cost is not None and tc.kind == "openai" and tc.model not in tc.prices:
            # Without a price nothing can be counted, and a budget that is silently ignored is worse than none.
            out.append(f"teacher.max_cost is set but teacher.prices has no entry for teacher.model '{tc.model}'; "
                       f"add its prices (input_cache_hit, input_cache_miss, output per million tokens) under "
                       f"teacher.prices.{tc.model}")
        for name, tpl in self.tasks.custom.items():
            for part in ("instruction", "input"):
                try:
                    getattr(tpl, part).format(chunk="", n="", question="")
                except (KeyError, IndexError, ValueError) as err:
                    out.append(f"tasks.custom.{name}.{part}: bad placeholder ({err}); use {{chunk}}, {{n}}, "
                               "{question}, and double braces for literal ones")
        return out

    # Paths derived from the fields, in one place so that every stage agrees.
    @property
    def work(self) -> Path:
        return Path(self.work_dir)

    @property
    def chunks_path(self) -> Path:
        return self.work / "chunks.jsonl"

    @property
    def tasks_path(self) -> Path:
        return self.work / "tasks.jsonl"

    @property
    def store_path(self) -> Path:
        return self.work / "teacher.sqlite"

    @property
    def examples_path(self) -> Path:
        return self.work / "examples.jsonl"

    @property
    def rejected_path(self) -> Path:
        return self.work / "rejected.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.work / "summary.json"

    @property
    def eval_dir(self) -> Path:
        return self.work / "eval"

    @property
    def merged_dir(self) -> Path:
        return Path(str(Path(self.output_dir)) + "_merged")

    @property
    def eval_jsonl_path(self) -> Path:
        p = Path(self.jsonl_output_path)
        return p.with_name(p.stem + ".eval" + p.suffix)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`teacher.max_concurrency=32` -> ("teacher.max_concurrency", 32); values are read as YAML."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set teacher.max_concurrency=32")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _format_one(error: dict, source: str) -> list[str]:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return [f"{source}: unknown key '{key}'; check its spelling against the README's configuration table"]
    if error["type"] == "missing":
        return [f"{source}: '{key}' is required"]
    if error["type"] == "value_error" and not error["loc"]:  # the cross-field checks, one per line
        return [f"{source}: {line}" for line in error["msg"].removeprefix("Value error, ").splitlines()]
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
    return [f"{source}: '{key}': {error['msg']}{shown}"]


def _format_errors(err: ValidationError, source: str) -> list[str]:
    """Every problem, one line each, so a config is fixed in one round rather than one per error."""
    return [line for error in err.errors() for line in _format_one(error, source)]


def _format_error(err: ValidationError, source: str) -> str:
    """The first problem only (shifu.check reports the others one by one)."""
    return _format_errors(err, source)[0]


def config_from_dict(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UserError("\n".join(_format_errors(err, source))) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found; pass a YAML file such as configs/demo.yaml")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise UserError(f"{p}: the top level must be a mapping of keys to values")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return config_from_dict(tree, str(path or "config"))


_SECRET_HINTS = ("api_key", "secret", "password", "token_value", "authorization")


def redacted(value: Any) -> Any:
    """Drop anything that looks like a secret, however deep, before a config is written out."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if any(h in str(k).lower() for h in _SECRET_HINTS) and k != "api_key_env"
                    else redacted(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(redacted(cfg.model_dump(mode="json")), allow_unicode=True, sort_keys=False)
