"""`clora`: the command line. One module per command group; each command builds Settings once.

The `clora` console script (and `python -m clora.cli.main`) imports this module; so does every
process vLLM spawns from `clora serve` (multiprocessing's spawn imports the parent's main module
first), which is where such a process is told to log to the engine log and die with its parent.
"""

from __future__ import annotations

from clora.runtime.engine.child import become_engine_child, spawned_for_engine

if spawned_for_engine():  # a process vLLM spawned from `clora serve`: before anything else is imported
    become_engine_child()

import typer  # noqa: E402

from clora.cli.adapters import adapters_app  # noqa: E402
from clora.cli.bench import bench_app  # noqa: E402
from clora.cli.customers import customers_app, operators_app  # noqa: E402
from clora.cli.dead_letters import dead_app  # noqa: E402
from clora.cli.demo import demo  # noqa: E402
from clora.cli.evals import eval_app  # noqa: E402
from clora.cli.ingest import ingest  # noqa: E402
from clora.cli.serve import serve  # noqa: E402
from clora.cli.train import train  # noqa: E402
from clora.cli.trainer_config import trainer_config_app  # noqa: E402

app = typer.Typer(help="clora: continual learning for LLM agents, one LoRA adapter per customer.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.command()(serve)
app.command()(ingest)
app.command()(train)
app.command()(demo)
app.add_typer(customers_app, name="customers")
app.add_typer(operators_app, name="operators")
app.add_typer(adapters_app, name="adapters")
app.add_typer(eval_app, name="eval")
app.add_typer(trainer_config_app, name="trainer-config")
app.add_typer(dead_app, name="dead-letters")
app.add_typer(bench_app, name="bench")

if __name__ == "__main__":
    app()
