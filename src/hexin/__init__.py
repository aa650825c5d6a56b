"""hexin: a from-scratch Llama inference engine and chat product on PyTorch tensors."""

__version__ = "0.1.0"
