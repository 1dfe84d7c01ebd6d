"""amp4ec: adaptive model partitioning for deep-learning inference on edge clusters."""

__version__ = "0.1.0"

__all__ = ["__version__"]
