"""Built-in scenario files, installed as the package ``lfm_zonal.scenarios``."""
