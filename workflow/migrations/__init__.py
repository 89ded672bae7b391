"""The workflow tier's migrations: a branch of durable-tiers' Alembic history
(`workflow`, depending on the engine's), applied when a WorkflowManager starts or by
`tiers db upgrade`; found through the `tiers.migrations` entry point."""

from __future__ import annotations

from pathlib import Path

from retrier.migrations import Branch

BRANCH = Branch("workflow", Path(__file__).parent / "versions")
