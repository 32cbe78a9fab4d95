"""vae_edge.evaluation: measures an exported bundle on the test set (`vae-eval`).

It reads the bundle through the runtime (encode, decode, nearest) and, when given one, the
training checkpoint through PyTorch; so it sits beside training/ and runtime/, not inside
either: the runtime stays numpy + onnxruntime, and training never needs a bundle.
"""
