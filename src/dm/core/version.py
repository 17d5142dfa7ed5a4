"""dm's version, in one place (the package metadata reads it)."""

__version__ = "0.1.0"
