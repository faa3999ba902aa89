"""imgapi's service package: everything but the entry points (`imgapi.py`, `jobs.py`) and the
caption models (`models/`). Importing it does nothing: no app, database, Redis or model."""
