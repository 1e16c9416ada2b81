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
        raise typer.Exit(err.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: rerun the same command to resume where it stopped")
        raise typer.Exit(130)


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
def estimate(config: str = ConfigArg, set_: Optional[List[str]] = SetOpt, verbose: bool = VerboseOpt) -> None:
    def go() -> None:
        from shifu.config import load_config
        from shifu.estimate import print_estimate, run_estimate
        from shifu.progress import setup_logging

        setup_logging(verbose)
        print_estimate(run_estimate(load_config(config, set_)))

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


for _stage in STAGES:
    _stage_command(_stage.name, _stage.help)


def main() -> None:
    app(prog_name="shifu")


if __name__ == "__main__":
    sys.exit(main())
