"""``python -m trainer_client --gateway URL --out DIR ...``: the Online DPO trainer process."""

from trainer_client.cli import app

app(prog_name="python -m trainer_client")
