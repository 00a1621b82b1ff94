"""Feature cache: one-time extraction jobs writing versioned Parquet feature sets."""
