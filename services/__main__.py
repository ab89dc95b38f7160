"""``python -m services serve --config FILE``: the same commands as ``reward-router rm``."""

from services.cli import app

if __name__ == "__main__":
    app()
