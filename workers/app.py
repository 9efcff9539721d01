"""Entry point for ``celery -A workers.app worker``."""

from workers.tasks import app

__all__ = ["app"]
