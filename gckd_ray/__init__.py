"""gckd-ray: distributed unsupervised domain adaptation for text-to-image person retrieval."""

__version__ = "0.1.0"
