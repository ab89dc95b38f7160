"""Test launcher: the gateway app with the OpenRLHF router mounted (the one line the gateway
needs), served by uvicorn: ``python -m tests.trainer.openrlhf_gateway CONFIG``."""

from __future__ import annotations

import sys

import uvicorn

from gateway.app import build_app
from gateway.settings import load_settings
from trainer_client.openrlhf import build_openrlhf_router

if __name__ == "__main__":
    settings = load_settings(sys.argv[1])
    app = build_app(settings)
    if not any(getattr(r, "path", "") == "/get_reward" for r in app.routes):
        app.include_router(build_openrlhf_router())
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
