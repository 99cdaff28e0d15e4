"""Deployable models: the model file format and export."""
