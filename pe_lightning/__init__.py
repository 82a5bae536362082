"""pe-lightning: the open training recipe for Meta's Perception Encoder, on PyTorch Lightning."""

__version__ = "0.1.0"
