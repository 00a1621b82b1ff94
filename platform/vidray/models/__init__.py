"""Model definitions for one device: encoders, fusion models and their checkpoint loaders."""
