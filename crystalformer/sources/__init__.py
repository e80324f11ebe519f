"""Adapters that turn external data (snapshots, Materials Project, JARVIS) into RawInputs."""
