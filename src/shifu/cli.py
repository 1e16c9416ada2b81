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

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="shifu (师父): distill a teacher LLM into a small student model, from raw text.")

ConfigArg = typer.Argument(..., help="YAML configuration file, e.g. configs/demo.yaml")
SetOpt = typer.Option(None, "--set", "-s", help="Override a field: --set teacher.max_concurrency=32 (repeatable)")
ForceOpt = typer.Option(False, "--force", help="Redo the stage even if its outputs are up to date")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Debug logging")


def _guarded(fn: Callable[[], None]) -> None:
    """User mistakes end in one red line and a non-zero exit, never a traceback."""
    from shifu.progress import console

    try:
        fn()
    except UserError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: rerun the same command to resume where it stopped")
        raise typer.Exit(130)


def _stage_command(name: str, help_text: str) -> None:
    def command(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt,
                verbose: bool = VerboseOpt) -> None:
        def go() -> None:
            from shifu.config import load_config
            from shifu.pipeline import run_stage
            from shifu.progress import setup_logging
            from shifu.report import print_stage

            setup_logging(verbose)
            print_stage(name, run_stage(name, load_config(config, set_), force))

        _guarded(go)

    app.command(name=name, help=help_text)(command)


@app.command(help="Run every stage in order: chunk, tasks, teach, dataset, train, merge, eval.")
def run(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt,
        until: Optional[str] = typer.Option(None, help="Stop after this stage, e.g. --until dataset"),
        verbose: bool = VerboseOpt) -> None:
    def go() -> None:
        from shifu.config import load_config
        from shifu.pipeline import run_all
        from shifu.progress import setup_logging
        from shifu.report import print_summary

        setup_logging(verbose)
        cfg = load_config(config, set_)
        if until is not None and until not in STAGES:
            raise UserError(f"--until {until!r}: choose one of {', '.join(STAGES)}")
        run_all(cfg, force, until)
        print_summary(cfg)

    _guarded(go)


@app.command(help="Before spending anything: requests, tokens, price, and GPU memory for training.")
def estimate(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt, verbose: bool = VerboseOpt) -> None:
    def go() -> None:
        from shifu.config import load_config
        from shifu.estimate import print_estimate, run_estimate
        from shifu.progress import setup_logging

        setup_logging(verbose)
        print_estimate(run_estimate(load_config(config, set_)))

    _guarded(go)


STAGES = {
    "chunk": "Read raw_data_path and split it into chunks (work_dir/chunks.jsonl).",
    "tasks": "Turn chunks into teacher tasks (work_dir/tasks.jsonl).",
    "teach": "Have the teacher answer every task; resumable, never pays twice (work_dir/teacher.sqlite).",
    "dataset": "Write the Alpaca-style JSONL (jsonl_output_path and its .eval split).",
    "train": "LoRA-train the student with LM + distillation loss (output_dir).",
    "merge": "Merge the adapter into a full safetensors model (<output_dir>_merged).",
    "eval": "Score the student before and after training on held-out chunks (work_dir/eval).",
}
for _name, _help in STAGES.items():
    _stage_command(_name, _help)


def main() -> None:
    app(prog_name="shifu")


if __name__ == "__main__":
    sys.exit(main())
