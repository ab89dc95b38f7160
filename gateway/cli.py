"""``reward-router gateway ...`` commands (``python -m gateway ...`` runs the same app).

Heavy imports (torch, the app) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)


@app.callback()
def _main() -> None:
    """The router gateway: what trainers talk to."""


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML settings file (docs/gateway.md)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8080)")] = None,
) -> None:
    """Serve the gateway: RM endpoints, router artifact, store, keys and policy from --config
    and REWARD_ROUTER_GATEWAY_* / REDIS_URL environment variables."""
    import uvicorn

    from gateway.app import build_app
    from gateway.service import GatewayService
    from gateway.settings import load_settings
    from reward_router.errors import RewardRouterError
    from reward_router.http import header_timeout_protocol

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    try:
        settings = load_settings(config, **overrides)
        # Built here, not in the app's lifespan, so a missing router artifact or an unusable
        # store file is one line and exit 2, not a traceback from inside uvicorn.
        service = GatewayService.build(settings)
    except RewardRouterError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(
        build_app(settings, service),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_keep_alive=int(settings.keep_alive_s),
        http=header_timeout_protocol(settings.header_timeout_s),
    )
