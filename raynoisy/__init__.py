"""raynoisy: noisy-label learning methods on Ray Train, Ray Data and Ray Tune."""

__version__ = "0.1.0"
