"""Experiment configs: `get_config()` in each file returns a ConfigDict."""
