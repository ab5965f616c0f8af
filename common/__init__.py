"""tidal.common"""
