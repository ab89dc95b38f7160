"""``python -m reward_router_cli``: the ``reward-router`` command."""

from reward_router_cli.main import main

main()
