"""``python -m farm.api``: serve the HTTP API on ``FARM_API_HOST:FARM_API_PORT``."""

from __future__ import annotations

import uvicorn

from farm.api.app import create_app
from farm.config import Config


def serve(config: Config | None = None) -> None:
    """Run the API with uvicorn until interrupted."""
    config = config or Config.from_env()
    uvicorn.run(create_app(config), host=config.api_host, port=config.api_port)


if __name__ == "__main__":
    serve()
