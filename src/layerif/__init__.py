"""layerif: per-layer influence scores (LayerIF) for pretrained LLMs."""

__version__ = "0.1.0"
