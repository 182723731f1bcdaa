"""Helpers for tests, fixtures and scripts: synthetic models in llama.cpp's GGUF layout (``synthetic``).

Part of the package (not of tests/) so that scripts and tests import one copy.
"""
