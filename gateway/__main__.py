"""``python -m gateway serve --config FILE``: the same as ``reward-router gateway serve``."""

from gateway.cli import app

if __name__ == "__main__":
    app(prog_name="python -m gateway")
