"""Fixtures the attack classes share with tests/test_sql.py."""
from ..test_sql import outside, ws  # noqa: F401 - fixtures: an ingested workspace, a folder beside it
