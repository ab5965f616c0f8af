"""tidal.cluster"""
