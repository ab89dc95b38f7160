"""The ``reward-router`` command line: one entry point, one sub-app per part of the project.

Sub-apps live next to the code they drive and import heavy libraries (torch, transformers)
only inside their commands, so ``reward-router --help`` stays fast.
"""

from __future__ import annotations

import typer

from gateway.cli import app as gateway_app
from gateway.offline.cli import app as router_app
from gateway.replay_cli import replay
from gateway.simulate_cli import simulate
from reward_router_cli.cluster import up
from reward_router_cli.demo import demo
from services.cli import app as rm_app
from trainer_client.cli import train_dpo

app = typer.Typer(
    name="reward-router",
    help="Route each preference pair to exactly one reward model (BayesianRouter).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(router_app, name="router", help="Train and inspect the offline router.")
app.add_typer(rm_app, name="rm", help="Reward-model scoring services and the small RM pool.")
app.add_typer(gateway_app, name="gateway", help="The router gateway.")
app.command("replay")(replay)
app.command("simulate")(simulate)
app.command("train-dpo")(train_dpo)
app.command("up")(up)
app.command("demo")(demo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
