"""tidal.learner"""
