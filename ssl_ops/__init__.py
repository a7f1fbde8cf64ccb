"""ssl-ops: semi-supervised image classification from very few labels, as a tracked MLOps system."""

__version__ = "0.1.0"
