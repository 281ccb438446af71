"""The zones stage: connected zones of a grid, their virtual buses and zonal indices.

``segmentation`` (features from the AC sensitivities, connectivity-constrained
clustering, aggregation weights W, the segmentation error against K).
"""
