"""Studies that run the pipeline: ``scenario`` (TOML scenarios), ``job`` (the main job in
memory: base case, zones, every market checked in AC), ``results`` (its results folder),
``report`` (report.md and the warnings on violations left), ``sweep`` (many days,
resumable) and ``regression`` (golden nodal results).
"""
