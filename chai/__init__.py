"""chai: Clustered Head Attention (Agarwal et al., ICML 2024) and its baselines as a research framework."""

__version__ = "0.1.0"
