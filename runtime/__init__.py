"""vae_edge.runtime: decode and search a VAE bundle with numpy and onnxruntime only.

    from vae_edge.runtime import Runtime
    rt = Runtime.load()            # the shipped default bundle, checksums verified
    images = rt.decode(z)          # (d,) -> (1, 28, 28) float32 in [0, 1]
    matches = rt.nearest(z, k=5)   # ids, labels, log_likelihoods, best first
"""

from .bundle import Bundle, BundleError, CatalogIndex
from .checks import parse_z
from .core import Runtime
from .search import Matches

__all__ = ["Bundle", "BundleError", "CatalogIndex", "Matches", "Runtime", "parse_z"]
