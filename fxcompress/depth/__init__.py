"""Depth compression (the LayerMerge method): analysis, segments, importance, the DP, relax,
merge."""
