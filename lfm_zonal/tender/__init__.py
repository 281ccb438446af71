"""Probabilistic tender sizing (Vannoni et al.): ``sizing`` (needs, offers, pooled tenders,
temporal and spatial aggregation) and ``congestion`` (tenders per zone of a real grid).
"""
