"""What a tier adds to the dashboard, and finding the tiers that add something."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

log = logging.getLogger("tiers.dashboard")

if TYPE_CHECKING:
    from ._core import Dashboard

RunLinks = Callable[[Any], Sequence[tuple[str, str]]]
"""Links a tier adds to a run's page: (label, path under the dashboard's root)."""


@dataclass(frozen=True)
class Section:
    """One tier's pages.

    `nav`: (label, path) entries of the top bar; `routes`: its Starlette routes, with
    paths under the dashboard's root; `templates`: a directory of its Jinja templates
    (name them `<section>/<page>.html`, and extend `base.html`); `hidden_fn_prefixes`:
    functions whose runs are the tier's own machinery, hidden from the runs page unless
    asked for; `run_links`: links to show on a run's page.
    """

    name: str
    nav: Sequence[tuple[str, str]] = ()
    routes: Sequence[BaseRoute] = ()
    templates: Path | None = None
    hidden_fn_prefixes: Sequence[str] = ()
    run_links: RunLinks | None = None
    extra: dict[str, Any] = field(default_factory=dict)


SectionFactory = Callable[["Dashboard"], Section]

GROUP = "tiers.dashboard"


def installed_sections() -> list[SectionFactory]:
    """The `tiers.dashboard` entry points, by name; one that fails to load is skipped
    with a warning (a broken tier must not take the dashboard down)."""
    found: list[SectionFactory] = []
    for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name):
        try:
            found.append(ep.load())
        except Exception as exc:
            log.warning("cannot load dashboard section %s: %s", ep.name, exc)
    return found
