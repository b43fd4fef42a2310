"""Helpers of the preference-alignment trainer ``fastpref.train``."""
