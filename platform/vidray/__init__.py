"""vidray: Ray-based data-and-training platform for video-language pre-training."""

__version__ = "0.1.0"
