"""Test-suite setup: the guard of tests/_guard.py, which makes a test that reads outside the
repository (and outside the installation, temporary and system folders) fail with a clear
RuntimeError, the way it would fail in a fresh clone."""
import sys

from tests import _guard

sys.addaudithook(_guard.audit_hook)  # at import time, so collection is guarded too


def pytest_configure(config):
    _guard.allow(config.option.basetemp)  # --basetemp may lie anywhere


def pytest_unconfigure(config):
    _guard.active = False  # audit hooks cannot be removed; stop checking once pytest is done
