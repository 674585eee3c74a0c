"""Datasets of the plugin (importing this package registers nothing)."""
