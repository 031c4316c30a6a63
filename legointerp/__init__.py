"""legointerp: mechanistic interpretability for transformers trained on the LEGO reasoning task."""

__version__ = "0.1.0"
