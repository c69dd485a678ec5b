"""soma-manifest: Terraform-style desired state for single-cell atlases in TileDB-SOMA."""

__version__ = "0.1.0"
