"""Rollout: turning prompts into scored groups of samples through the engines."""
from vime.rollout.context import RolloutContext

__all__ = ["RolloutContext"]
