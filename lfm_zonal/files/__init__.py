"""Files in and out: ``inputs`` (reading text inputs with one-line errors) and ``outputs``
(result folders written atomically, locks, CSV and standard JSON)."""
