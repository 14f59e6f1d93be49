"""Helpers for tests that start real servers on 127.0.0.1 (re-exported from infra._proc)."""
from infra._proc import free_port, stop_group, wait_http

__all__ = ["free_port", "wait_http", "stop_group"]
