"""Calibration and evaluation data, local files first (layout of the shared data folder), hub as a fallback."""
