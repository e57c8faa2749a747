"""The package version, in the bottom layer so that any layer may record it (quantized folders do)."""
__version__ = "0.1.0"
