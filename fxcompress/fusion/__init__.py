"""Layer Fusion: share or drop blocks whose weights or activations are alike.

Modules, in pipeline order: :mod:`.blocks` (repeated blocks and their roles), :mod:`.align`
(weight matching), :mod:`.similarity` (weight cosine, linear CKA), :mod:`.schedule` (candidate
pairs and the greedy choice), :mod:`.rewrite` (share / drop surgery), :mod:`.pipeline`
(``fuse``), :mod:`.report`. See ``docs/fusion.md``.
"""

from __future__ import annotations

from fxcompress.fusion.blocks import Block, Blocks, find_blocks
from fxcompress.fusion.pipeline import fuse
from fxcompress.fusion.report import Fusion, FusionReport

__all__ = ["Block", "Blocks", "Fusion", "FusionReport", "find_blocks", "fuse"]
