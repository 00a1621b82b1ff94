"""Frames models: trained end to end on sparsely sampled frames (the ``frames`` feature set)."""
