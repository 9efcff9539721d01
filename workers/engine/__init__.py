"""Diffusion engines: one class per model family behind workers.engine.base.Engine.

Kept light: importing this package imports no torch. Use workers.engine.loader.load_engine
for checkpoints and workers.engine.synthetic.SyntheticEngine for plumbing tests.
"""

from workers.engine.base import SAMPLERS, SCHEDULES, BatchRequest, Engine, EngineError, ImageRequest

__all__ = ["SAMPLERS", "SCHEDULES", "BatchRequest", "Engine", "EngineError", "ImageRequest"]
