"""featurestore: a feature store and embedding database for image classification."""

__version__ = "0.1.0"
