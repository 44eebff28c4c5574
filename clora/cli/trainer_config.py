"""`clora trainer-config`: a customer's training configuration, through the running gateway's
admin API (which checks that the engine can serve the adapter shape it asks for)."""

from __future__ import annotations

import json

import typer
from pydantic import ValidationError
from rich.table import Table

from clora.agents.catalog import make_env
from clora.cli.common import call_admin, console, fail
from clora.core.settings import Settings
from clora.wire.trainer_config import TenantConfig

trainer_config_app = typer.Typer(help="A customer's training configuration: show it, change settings.",
                                 no_args_is_help=True)
WHY = "configs are checked against its engine"


def _print(customer: str, config: TenantConfig) -> None:
    table = Table("setting", "value", title=f"trainer config of {customer}")
    for key, value in config.model_dump().items():
        table.add_row(key, json.dumps(value))
    console.print(table)


@trainer_config_app.command("show")
def show(customer: str) -> None:
    """The customer's training configuration (the defaults until one is set)."""
    _print(customer, call_admin(Settings(), lambda admin: admin.trainer_config(customer), WHY))


def _parse(assignments: list[str]) -> dict:
    """`key=value` pairs; values are JSON where they parse as JSON (numbers, true, lists), else text."""
    out = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@trainer_config_app.command("set")
def set_(customer: str, assignments: list[str] = typer.Argument(..., help="KEY=VALUE, e.g. lr=2e-3 gated=true "
                                                                          "environment=preference:json")) -> None:
    """Change settings of the customer's configuration (the others keep their values)."""
    settings, changes = Settings(), _parse(assignments)

    async def action(admin):
        current = await admin.trainer_config(customer)
        try:
            config = TenantConfig.model_validate({**current.model_dump(), **changes})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise fail(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
        if config.environment:
            try:
                make_env(config.environment)  # the trainer must be able to build it
            except ValueError as exc:
                raise fail(str(exc)) from None
        return await admin.set_trainer_config(customer, config)

    _print(customer, call_admin(settings, action, WHY))
