"""Studies that run the pipeline: ``scenario`` (TOML scenarios), ``job`` (the main job: base
case, zones, every market, AC check, results folder), ``sweep`` (many days, resumable)
and ``regression`` (golden nodal results).
"""
