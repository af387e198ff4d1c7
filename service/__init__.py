"""convserve: a model-serving service for image classifiers (image uploads, KServe v2, TF Serving REST)."""

__version__ = "0.1.0"
