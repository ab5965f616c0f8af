"""tidal.rollout"""
