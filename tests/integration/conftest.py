"""Fixtures shared by the integration tests beyond those of ``tests/conftest.py``."""

from tests.fixtures.s3 import aws_env, s3_endpoint  # noqa: F401 - fixtures, found here by pytest
