"""TNet: the multi-scale hard-attention classifier of arXiv 2102.10212, in plain PyTorch."""
