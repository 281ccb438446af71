"""Figures (``plots``): zone maps, K comparison, before/after and tender plots, drawn from
plain arrays and tables so that every stage can use them."""
