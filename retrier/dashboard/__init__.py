"""The web dashboard: an ASGI app (Starlette, Jinja2 templates rendered on the server)
that shows runs, workers, pools and workflows, and acts on them.

>>> from retrier.dashboard import create_app
>>> app = create_app("sqlite:///tiers.db", token="s3cret")      # serve with uvicorn
>>> main_app.mount("/tiers", create_app(retrier, authorize=is_admin))  # or mount it

Needs the `dashboard` extra (`pip install 'durable-tiers[dashboard]'`). The retrier
gives the overview, runs and workers pages; each higher tier adds its own through the
`tiers.dashboard` entry-point group (a function of the `Dashboard` returning a
`Section`), so this package never imports them.
"""

from __future__ import annotations

from ._app import create_app
from ._charts import activity_chart, timeline
from ._core import Dashboard
from ._format import short_id
from ._sections import Section
from ._security import Authorize

__all__ = [
    "Authorize",
    "Dashboard",
    "Section",
    "activity_chart",
    "create_app",
    "short_id",
    "timeline",
]
