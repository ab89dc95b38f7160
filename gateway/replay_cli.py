"""``reward-router replay``: evaluate routing policies on recorded reward-model behaviour."""


def replay() -> None:
    """Replay evaluation (being built)."""
    raise SystemExit("not built yet")
