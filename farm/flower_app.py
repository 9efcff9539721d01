"""Celery app for Flower (``celery -A farm.flower_app flower``): settings only, no torch."""

from farm.celery_app import make_app
from farm.config import load

app = make_app(load())
