"""concerto-ray: Concerto / Sonata point-cloud pre-training and fine-tuning on Ray."""

__version__ = "0.1.0"
