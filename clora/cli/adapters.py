"""`clora adapters`: publish, route (promote/rollback) and list a customer's versions, through the
running gateway's admin API (it owns the routing table and the engine)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from clora.cli.common import call_admin, console
from clora.core.settings import Settings

adapters_app = typer.Typer(help="Adapter versions: publish, route (promote/rollback), list.", no_args_is_help=True)
WHY = "adapters are loaded into its engine"


@adapters_app.command("publish")
def adapters_publish(customer: str, path: Path, candidate: bool = typer.Option(
        False, "--candidate", help="Only register it: the promotion gate (or `clora eval promote`) serves it.")) -> None:
    """Publish a PEFT adapter dir as the customer's next version and switch traffic to it."""
    out = call_admin(Settings(), lambda admin: admin.publish(customer, path, origin="manual",
                                                             switch=not candidate), WHY)
    if candidate:
        console.print(f"{customer}: candidate [bold]{out.name}[/] registered (not served yet)")
    else:
        console.print(f"{customer} now served by [bold]{out.name}[/] (load + switch {out.swap_ms:.0f} ms)")


@adapters_app.command("route")
def adapters_route(customer: str, adapter: str) -> None:
    """Switch a customer to one of its versions (promote or roll back)."""
    out = call_admin(Settings(), lambda admin: admin.route(customer, adapter), WHY)
    console.print(f"{customer} now served by [bold]{out.name}[/]")


@adapters_app.command("list")
def adapters_list(customer: str) -> None:
    """A customer's adapter versions; the current one is marked."""
    out = call_admin(Settings(), lambda admin: admin.versions(customer), WHY)
    table = Table("version", "current", "source", "path")
    for v in out.versions:
        table.add_row(v.name, "*" if v.name == out.current else "", v.source, v.path)
    console.print(table)
