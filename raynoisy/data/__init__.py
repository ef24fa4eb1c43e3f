"""The noisy-data layer: sources, noise models, splits, Parquet shards and Ray Data pipelines."""
