"""Prefect flows: thin wiring of crystalformer library calls into tasks and flows."""

import os

# Closed networks and slow first starts of the temporary local API (ENVIRONMENT.md).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
