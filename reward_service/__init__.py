"""tidal.reward_service"""
