"""Reward models behind one interface (`base.RewardModel`), one module per scorer, loaded by name on demand."""
from .base import RewardModel, available_rewards, load_reward, register_reward

__all__ = ["RewardModel", "available_rewards", "load_reward", "register_reward"]
