"""The `shifu` command: a table from subcommands to stage functions.

    shifu run configs/demo.yaml                      # every stage, skipping what is up to date
    shifu teach configs/demo.yaml --set teacher.max_concurrency=32
    shifu estimate configs/deepseek-qwen2.5-7b.yaml  # requests, tokens, price, GPU memory; spends nothing
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

import typer

from shifu.errors import UserError
from shifu.pipeline import ORDER, STAGES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="shifu (师父): distill a teacher LLM into a small student model, from raw text.")

ConfigArg = typer.Argument(..., help="YAML configuration file, e.g. configs/demo.yaml")
SetOpt = typer.Option(None, "--set", "-s", help="Override a field: --set teacher.max_concurrency=32 (repeatable)")
ForceOpt = typer.Option(False, "--force", help="Redo the stage even if its outputs are up to date")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Debug logging")
WaitOpt = typer.Option(False, "--wait", help="If another shifu process is using work_dir, wait for it instead of stopping")


def _guarded(fn: Callable[[], None]) -> None:
    """User mistakes end in one red line and a non-zero exit, never a traceback."""
    from shifu.progress import console

    try:
        fn()
    except UserError as err:
        for line in str(err).splitlines():  # several config errors: one line each
            console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: rerun the same command to resume where it stopped")
        raise typer.Exit(130) from None


def _stage_command(name: str, help_text: str) -> None:
    def command(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt,
                wait: bool = WaitOpt, verbose: bool = VerboseOpt) -> None:
        def go() -> None:
            from shifu.config import load_config
            from shifu.pipeline import run_stage
            from shifu.progress import setup_logging
            from shifu.report import print_stage

            setup_logging(verbose)
            print_stage(name, run_stage(name, load_config(config, set_), force, wait))

        _guarded(go)

    app.command(name=name, help=help_text)(command)


@app.command(help="Run every stage in order: chunk, tasks, teach, dataset, train, merge, eval.")
def run(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt,
        until: Optional[str] = typer.Option(None, help="Stop after this stage, e.g. --until dataset"),
        wait: bool = WaitOpt, verbose: bool = VerboseOpt,
        skip_check: bool = typer.Option(False, "--skip-check", help="Start without the checks of `shifu check`")) -> None:
    def go() -> None:
        from shifu.config import load_config
        from shifu.pipeline import run_all
        from shifu.progress import setup_logging
        from shifu.report import print_summary

        setup_logging(verbose)
        cfg = load_config(config, set_)
        if until is not None and until not in ORDER:
            raise UserError(f"--until {until!r}: choose one of {', '.join(ORDER)}")
        if not skip_check:
            from shifu.check import preflight

            preflight(cfg)
        run_all(cfg, force, until, wait)
        print_summary(cfg)

    _guarded(go)


@app.command(help="Before spending anything: requests, tokens, price, and GPU memory for training.")
def estimate(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt, verbose: bool = VerboseOpt,
             as_json: bool = typer.Option(False, "--json", help="Print the estimate as one JSON object on stdout")) -> None:
    def go() -> None:
        from shifu.config import load_config
        from shifu.estimate import print_estimate, print_estimate_json, run_estimate
        from shifu.progress import setup_logging

        setup_logging(verbose)
        (print_estimate_json if as_json else print_estimate)(run_estimate(load_config(config, set_)))

    _guarded(go)


@app.command(help="Find every problem a run would hit, in seconds, before anything is spent.")
def check(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt, verbose: bool = VerboseOpt) -> None:
    def go() -> None:
        from shifu.check import check_file, failures, print_check
        from shifu.progress import setup_logging

        setup_logging(verbose)
        results = check_file(config, set_)
        print_check(results)
        if failures(results):
            raise UserError(f"{len(failures(results))} check(s) failed (above); fix them and run shifu check again")

    _guarded(go)


@app.command(help="Write a commented config from a few flags, with training settings that fit the GPU.")
def init(teacher: Optional[str] = typer.Option(None, help="deepseek, openai (any OpenAI-compatible server) or local"),
         base_url: Optional[str] = typer.Option(None, help="Teacher server, e.g. http://127.0.0.1:8000/v1"),
         teacher_model: Optional[str] = typer.Option(None, help="Model name the server serves; a folder for local"),
         student: Optional[str] = typer.Option(None, help="Student: Hugging Face folder or hub name"),
         data: Optional[str] = typer.Option(None, help="Your text: a file, folder or glob"),
         gpu_memory: Optional[float] = typer.Option(None, help="GB of GPU memory for training (0: none)"),
         out: str = typer.Option("shifu.yaml", help="Config file to write"),
         force: bool = typer.Option(False, "--force", help="Overwrite an existing file")) -> None:
    def go() -> None:
        from shifu.init import run_init
        from shifu.progress import console

        path, why = run_init(out, teacher, base_url, teacher_model, student, data, gpu_memory, force)
        console.print(f"wrote {path} (training: {why}); next: shifu check {path}", highlight=False, soft_wrap=True)

    _guarded(go)


for _stage in STAGES:
    _stage_command(_stage.name, _stage.help)


# Using the student: chat, export, serve, push (shifu.chat, shifu.export, shifu.card).
QuantOpt = typer.Option("q8_0", "--quant", help="GGUF weights: f16, q8_0 or q4_k_m")


@app.command(help="Chat with the trained student in the terminal (streaming); --prompt for one answer.")
def chat(target: str = typer.Argument(..., help="YAML config of a run, or a model folder"),
         set_: Optional[List[str]] = SetOpt,
         compare: bool = typer.Option(False, "--compare", help="Answer each prompt with base and trained"),
         prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one prompt and exit"),
         system: Optional[str] = typer.Option(None, "--system", help="System message (default: train.system_prompt)"),
         max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
         temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy")) -> None:
    def go() -> None:
        from shifu.chat import run_chat
        from shifu.progress import setup_logging

        setup_logging(False)
        run_chat(target, set_, compare, prompt, system, max_new_tokens, temperature)

    _guarded(go)


@app.command(help="Export the merged student to GGUF with an Ollama Modelfile (<output_dir>_gguf).")
def export(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt,
           gguf: bool = typer.Option(False, "--gguf", help="Write GGUF (the one format for now)"),
           quant: str = QuantOpt,
           check: bool = typer.Option(True, "--check/--no-check", help="Compare greedy tokens with transformers"),
           pre_tokenizer: Optional[str] = typer.Option(None, "--pre-tokenizer",
                                                       help="llama.cpp pre-tokenizer name for a tokenizer it does not know"),
           verbose: bool = VerboseOpt) -> None:
    def go() -> None:
        from shifu.config import load_config
        from shifu.export import run_export
        from shifu.progress import setup_logging
        from shifu.report import print_stage

        setup_logging(verbose)
        if not gguf:
            raise UserError("shifu export: say the format, e.g. `shifu export CONFIG --gguf --quant q4_k_m`")
        print_stage("export", run_export(load_config(config, set_), quant, check, pre_tokenizer))

    _guarded(go)


@app.command(help="Serve the student over an OpenAI-compatible API (llama.cpp on its GGUF; vLLM on a GPU).")
def serve(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt, quant: str = QuantOpt,
          host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes it to the network"),
          port: int = typer.Option(8000, "--port", min=1, max=65535),
          engine: str = typer.Option("auto", "--engine", help="auto, llama.cpp or vllm"),
          verbose: bool = VerboseOpt) -> None:
    def go() -> None:
        from shifu.config import load_config
        from shifu.progress import setup_logging
        from shifu.serve import run_serve

        setup_logging(verbose)
        run_serve(load_config(config, set_), quant, host, port, engine)

    _guarded(go)


@app.command(help="Upload the merged student (or the adapter) with its model card to the Hugging Face Hub.")
def push(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt,
         repo: str = typer.Option(..., "--repo", help="Hub repository, e.g. me/qwen-kongyiji"),
         adapter: bool = typer.Option(False, "--adapter", help="Upload the LoRA adapter instead of the merged model"),
         private: bool = typer.Option(False, "--private", help="Create the repository private")) -> None:
    def go() -> None:
        from shifu.card import run_push
        from shifu.config import load_config
        from shifu.progress import console

        console.print(run_push(load_config(config, set_), repo, adapter, private))

    _guarded(go)


def main() -> None:
    app(prog_name="shifu")


if __name__ == "__main__":
    sys.exit(main())
