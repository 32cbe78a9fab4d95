"""vae_edge.training: the PyTorch side (model, data, training loop)."""
