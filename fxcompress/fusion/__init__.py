"""Layer Fusion: share or drop blocks whose weights or activations are alike."""

from __future__ import annotations

from fxcompress.fusion.pipeline import Block, Blocks, Fusion, FusionReport, find_blocks, fuse

__all__ = ["Block", "Blocks", "Fusion", "FusionReport", "find_blocks", "fuse"]
