"""`clora bench experiments`: N concurrent RL experiments on one warm runtime vs one at a time (see
clora.bench.experiments). Starts its own runtimes; writes JSON, a markdown table and a PNG."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clora.cli.common import console, exit_stopped, fail, run_serving, setup_logging
from clora.core.processes import ServiceStartError
from clora.core.settings import Settings
from clora.core.state import serve_state

bench_app = typer.Typer(help="Benchmarks that start their own runtime.", no_args_is_help=True)
RESULT = "experiment_throughput.json"


def default_out() -> Path | None:
    """benchmarks/results/ of the checkout clora is installed from (None: not installed from one)."""
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"  # clora/cli/ of a checkout
    return results / RESULT if results.is_dir() else None


def parse_ns(text: str, option: str) -> list[int]:
    try:
        ns = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise fail(f"{option} takes comma-separated whole numbers, got {text!r}") from None
    if not ns or ns[0] < 1:
        raise fail(f"{option} needs numbers of at least 1, got {text!r}")
    return ns


@bench_app.command()
def experiments(ns: str = typer.Option("1,2,4,8", help="Concurrent experiments per run, comma-separated."),
                steps: int = typer.Option(10, min=1, help="RL steps per experiment."),
                tasks: int = typer.Option(2, min=1, help="Problems per experiment per step."),
                group: int = typer.Option(8, min=2, help="Episodes per problem (the GRPO group)."),
                serial_runs: int = typer.Option(4, min=1, help="Measured single experiments of each serial "
                                                               "kind (cold: seeds 0..k-1, warm: k..2k-1); "
                                                               "baselines are N x their mean."),
                environment: str = typer.Option("arithmetic:0", help="The experiments' environment."),
                model: str | None = typer.Option(None, help="`tiny` (a random 2-layer Llama: a quick sweep) or a "
                                                            "model directory [default: CLORA_MODEL or SmolLM2]."),
                freshness_ns: str = typer.Option("1", help="Feedback-only customers per freshness run alone, "
                                                           "comma-separated."),
                freshness_load: int = typer.Option(8, min=0, help="Feedback-only customers in a freshness run while "
                                                                  "as many RL experiments train (0: none)."),
                freshness_s: float = typer.Option(180.0, min=1.0, help="Seconds of feedback per freshness run (under "
                                                                       "load: at most, while the RL experiments train)."),
                freshness_interval_s: float = typer.Option(10.0, min=0.1, help="Mean seconds between one "
                                                                             "customer's feedback events."),
                out: Path | None = typer.Option(None, help=f"Result JSON (.md and .png beside it) [default: "
                                                           f"benchmarks/results/{RESULT} of the checkout]."),
                verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """The C-LoRA report's experiment at the product's defaults: time to finish N RL experiments
    concurrently on one warm runtime, vs one after another (cold: a fresh runtime each; warm: the
    same one), their rewards, and at N=8 the pre-registered non-inferiority verdict."""
    from clora.bench.experiments import SweepOptions, sweep  # torch loads only here
    from clora.bench.sweep_report import markdown, write

    settings = Settings()
    if serve_state(settings):
        raise fail("`clora serve` is running: the benchmark starts its own runtimes on both cores; stop it first")
    out = out or default_out()
    if out is None:
        raise fail("clora is not installed from a checkout (no benchmarks/results/): give --out")
    options = SweepOptions(ns=parse_ns(ns, "--ns"), steps=steps, tasks=tasks, group=group, serial_runs=serial_runs,
                           environment=environment, model=model, freshness_ns=parse_ns(freshness_ns, "--freshness-ns"),
                           freshness_load=freshness_load, freshness_s=freshness_s,
                           freshness_interval_s=freshness_interval_s)
    settings.home.mkdir(parents=True, exist_ok=True)
    setup_logging(verbose, file=settings.home / "bench.log")
    total = steps * (2 * serial_runs + sum(options.ns))  # the freshness runs' RL steps are not counted
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("starting", total=total)
        try:
            def checkpoint(partial: dict) -> None:  # before the freshness phase: kept if that phase fails
                console.print("throughput measured; wrote " + ", ".join(str(p) for p in write(partial, out)))
            result = run_serving(sweep(options, lambda n: progress.advance(task, n),
                                       lambda text: progress.update(task, description=text), checkpoint))
        except ServiceStartError as exc:
            raise fail(str(exc)) from None
    paths = write(result, out)
    console.print(markdown(result))
    console.print("wrote " + ", ".join(str(p) for p in paths))
    exit_stopped(0)
