"""vae_edge.export: checkpoint -> ONNX bundle with a float16 likelihood index."""
