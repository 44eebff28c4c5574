"""`clora customers` and `clora operators`: customers, their API keys, and operator keys."""

from __future__ import annotations

import asyncio
import time

import typer
from rich.table import Table

from clora.cli.common import call_admin, console, err, fail, with_redis
from clora.core.customers import CustomerStore, InvalidName
from clora.core.settings import Settings
from clora.core.state import serve_state

customers_app = typer.Typer(help="Customers and their API keys.", no_args_is_help=True)
operators_app = typer.Typer(help="Operator keys: send feedback for a set of customers.", no_args_is_help=True)


def _with_customers(action):
    return asyncio.run(with_redis(Settings(), lambda client: action(CustomerStore(client))))


def _through_api(action, why: str):
    """With `clora serve` running, the admin API does it (audited, and the gateway's key cache
    sees a revocation at once); None if it is not running (then Redis directly)."""
    settings = Settings()
    if serve_state(settings) is None:
        return None
    return call_admin(settings, action, why)


@customers_app.command("create")
def customers_create(name: str) -> None:
    """Create a customer and print its API key (shown once; only a hash is stored)."""
    try:
        key = _through_api(lambda client: client.create_customer(name), "creating a customer") \
            or _with_customers(lambda store: store.create(name))
    except InvalidName as exc:
        raise fail(str(exc)) from None
    err.print(f"created customer [bold]{name}[/]; its API key (store it now, it is not shown again):")
    console.print(key)


@customers_app.command("key")
def customers_key(name: str, revoke_old: bool = typer.Option(False, help="Revoke existing keys first.")) -> None:
    """Issue another API key for a customer."""
    async def action(store: CustomerStore) -> str:
        if revoke_old:
            await store.revoke_keys(name)
        return await store.issue_key(name)

    try:
        console.print(_through_api(lambda client: client.issue_key(name, revoke_old), "issuing a key")
                      or _with_customers(action))
    except KeyError:
        raise fail(f"no customer named {name!r}") from None


@customers_app.command("list")
def customers_list() -> None:
    """List customers."""
    table = Table("customer", "created")
    for c in _with_customers(lambda store: store.list()):
        table.add_row(c.name, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.created_at)))
    console.print(table)


@operators_app.command("create")
def operators_create(name: str, customer: list[str] = typer.Option(..., "--customer", "-c",
                                                                    help="A customer in scope (repeat).")) -> None:
    """Create an operator key scoped to the given customers (shown once; only a hash is stored)."""
    try:
        key = _through_api(lambda client: client.create_operator(name, customer), "creating an operator") \
            or _with_customers(lambda store: store.create_operator(name, customer))
    except InvalidName as exc:
        raise fail(str(exc)) from None
    err.print(f"created operator [bold]{name}[/] for {', '.join(sorted(set(customer)))}; its key:")
    console.print(key)
