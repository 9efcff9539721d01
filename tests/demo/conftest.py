"""Demo model tests: the data set and analyser (numpy/PIL), the trained checkpoint rendered
through the engine, the training script's smoke configuration."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
