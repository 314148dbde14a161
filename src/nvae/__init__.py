"""NVAE: A Deep Hierarchical Variational Autoencoder (Vahdat & Kautz, NeurIPS 2020), in PyTorch."""
from .config import PRESETS, NVAEConfig
from .model.network import NVAE, NVAEOutput

__all__ = ["NVAE", "NVAEConfig", "NVAEOutput", "PRESETS"]
__version__ = "0.1.0"
