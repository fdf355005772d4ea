"""pytest fixtures for dqr and its plugins (registered through the
``pytest11`` entry point, so installing dqr makes them available)."""

from __future__ import annotations
