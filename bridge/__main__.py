"""`python -m bridge` runs the live-bridge command line."""

from __future__ import annotations

from bridge.cli import main

main()
