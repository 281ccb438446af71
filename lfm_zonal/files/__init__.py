"""Files in and out: ``inputs`` (reading text inputs with one-line errors) and ``outputs``
(result folders written atomically, locks, CSV, numpy ``.npz`` and standard JSON)."""

#: Formats of the sensitivity matrices (``study.results.write_sensitivities``); here, light,
#: for the command line's choices.
SENSITIVITY_FORMATS = ("auto", "csv", "npz")
