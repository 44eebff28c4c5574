"""`clora demo`: the main job (simulated customers learning live; see clora.demo)."""

from __future__ import annotations

from pathlib import Path

import typer

from clora.cli.common import console, exit_stopped, fail, run_serving, setup_logging
from clora.core.processes import ServiceStartError
from clora.core.settings import Settings
from clora.core.state import serve_state


def demo(minutes: float = typer.Option(14.5, help="Time budget for the whole run, start-up included: "
                                                 "a round starts only if it and the final report fit."),
         requests_per_round: int = typer.Option(8, help="Questions each customer's agent asks per round."),
         max_rounds: int = typer.Option(0, help="Stop after this many rounds (0: when learnt or out of time)."),
         report_prompts: int = typer.Option(64, min=8, help="Report-set questions per customer (the reported "
                                                                "scores; disjoint from training and the gate set)."),
         out_dir: Path | None = typer.Option(None, help="Where demo.json and demo.png go "
                                                         "[default: <CLORA_HOME>/demo/<start time>/].")) -> None:
    """Simulated customers with hidden preferences learn live: traffic, operator feedback, training,
    the promotion gate; ends with a report (table, JSON, PNG). Starts everything on embedded defaults."""
    from clora.demo.options import DemoOptions
    from clora.demo.run import run_demo  # torch and matplotlib load only for the demo

    settings = Settings()
    if serve_state(settings):
        raise fail("`clora serve` is running: the demo starts its own stack; stop it first")
    log_file = settings.home / "demo.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    setup_logging(file=log_file)  # the screen is the live table
    options = DemoOptions(minutes=minutes, requests_per_round=requests_per_round, out_dir=out_dir,
                          max_rounds=max_rounds or None, report_prompts=report_prompts)
    try:
        report = run_serving(run_demo(settings, options, console))
    except ServiceStartError as exc:
        raise fail(str(exc)) from None
    exit_stopped(0 if report.passed else 1)
