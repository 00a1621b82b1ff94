"""Data: reading video, the corpus manifest and its adapters, the synthetic corpora, the clip
pipeline, quarantine records, and the example builders that turn feature sets into training rows."""
