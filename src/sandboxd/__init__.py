"""sandboxd: a self-hosted, E2B-compatible sandbox platform."""

__version__ = "0.1.0"
