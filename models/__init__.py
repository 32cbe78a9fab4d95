"""Shipped model bundles (data only): see models/README.md."""
