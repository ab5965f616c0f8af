"""tidal: distributed RLHF on Ray — SFT, reward models, PPO/GRPO/RLOO/REINFORCE."""

__version__ = "0.1.0"
