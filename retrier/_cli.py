"""The `tiers` command line: workers and a look at stored runs.

Higher tiers add their own command groups (`pools`, `workflows`) through the
`tiers.cli` entry-point group, so this module never imports them.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from importlib.metadata import entry_points
from typing import Any, NoReturn

import anyio
import click
from anyio.abc import TaskStatus
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from sqlalchemy.engine import URL, make_url

from ._checks import format_limit
from ._clock import SystemClock, ms_to_datetime
from ._dberrors import DRIVER_ERRORS, translate
from ._dialects import is_transient, open_dialect
from ._errors import TiersError
from ._explain import Why
from ._migrations import Migrations
from ._models import RunRow
from ._retrier import Retrier
from ._retrier import retrier_of as retrier_behind
from ._store import Store

console = Console()
# Status and errors go to stderr, so stdout carries only what was asked for.
err_console = Console(stderr=True)


def load_app(spec: str) -> Any:
    """Import `module:attribute` (the current directory is importable, as for uvicorn)."""
    if ":" not in spec:
        raise click.BadParameter(f"expected module:attribute, got {spec!r}")
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise click.BadParameter(f"{module_name!r} has no attribute {attr!r}") from None


def load_app_waiting_for_database(spec: str, patience: float = 120.0) -> Any:
    """`load_app`, retried while the database does not answer yet (a worker started
    with, or during a restart of, its database server), for up to `patience` s."""
    deadline = time.monotonic() + patience
    pause = 0.5
    while True:
        try:
            return load_app(spec)
        except Exception as exc:
            cause = _transient_cause(exc)
            if cause is None or time.monotonic() + pause > deadline:
                raise
            err_console.print(
                f"[yellow]the database does not answer yet[/yellow] "
                f"({type(cause).__name__}); trying again in {pause:g} s"
            )
        time.sleep(pause)
        pause = min(pause * 2, 10.0)


def _transient_cause(exc: BaseException | None) -> BaseException | None:
    seen = 0
    while exc is not None and seen < 10:
        if is_transient(exc):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def retrier_of(app: Any) -> Retrier:
    """The Retrier behind a Retrier, Workpool or WorkflowManager object."""
    try:
        return retrier_behind(app)
    except TypeError:
        raise click.BadParameter(
            "the app object is not a Retrier, Workpool or WorkflowManager"
        ) from None


class Context:
    """What every subcommand needs: a way to reach the database."""

    def __init__(self, db: str | None, app: str | None) -> None:
        self._db = db
        self._app = app
        self._store: Store | None = None

    def store(self, *, create: bool = False) -> Store:
        """The store of --db or --app. With --db, a SQLite file that does not exist is
        an error unless `create` (only `tiers db upgrade` creates a database)."""
        if self._store is None:
            if self._app:
                self._store = retrier_of(load_app(self._app)).store
            elif self._db:
                if not create:
                    open_dialect(self._db, create=False).dispose()
                self._store = Store(self._db, SystemClock())
            else:
                raise click.UsageError(
                    "say which database: --db URL (or TIERS_DATABASE_URL) or --app module:attr"
                )
        return self._store

    def app(self) -> Any:
        if not self._app:
            raise click.UsageError("this command needs --app module:attr (or TIERS_APP)")
        return load_app(self._app)

    def url(self) -> URL | None:
        """The database URL, once a command has opened the store."""
        return None if self._store is None else make_url(self._store.url)

    def close(self) -> None:
        """Release the connections of a store the command opened itself (--db)."""
        if self._store is not None and not self._app:
            self._store.dispose()


class TiersGroup(click.Group):
    """The `tiers` group: a library error anywhere below it (a bad URL, an unreachable
    or locked database, a missing run) ends the command with one line and exit code 1,
    never a traceback."""

    _plugins_loaded = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugins()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_plugins()
        return super().get_command(ctx, cmd_name)

    def _load_plugins(self) -> None:
        """Add the higher tiers' command groups (the `tiers.cli` entry points), once,
        when the command line runs: importing this module must not import them."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group="tiers.cli"):
            try:
                self.add_command(ep.load(), ep.name)
            except Exception as exc:  # a broken plugin must not take the CLI down
                err_console.print(
                    f"[yellow]warning:[/yellow] cannot load tiers command {ep.name}: {exc}"
                )

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TiersError as exc:
            fail(exc)
        except DRIVER_ERRORS as exc:  # from a path that has not translated it yet
            obj = ctx.obj if isinstance(ctx.obj, Context) else None
            error = translate(exc, obj.url() if obj is not None else None)
            if error is None:
                raise
            fail(error)


def fail(exc: TiersError) -> NoReturn:
    """Print `error: <message>` on stderr, on one line, and exit with code 1."""
    message = " ".join(str(exc).split())
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise SystemExit(1)


@click.group(cls=TiersGroup)
@click.option("--db", envvar="TIERS_DATABASE_URL", help="Database URL.")
@click.option("--app", envvar="TIERS_APP", help="module:attribute of your Retrier.")
@click.pass_context
def main(ctx: click.Context, db: str | None, app: str | None) -> None:
    """durable-tiers: durable retries, workpools and workflows."""
    ctx.obj = Context(db, app)
    ctx.call_on_close(ctx.obj.close)


@main.command()
@click.argument("app")
@click.option("--concurrency", type=click.IntRange(min=1), help="Runs executed at once.")
@click.option("--lease", type=click.FloatRange(min=0.3), help="Lease length in seconds.")
@click.option("--poll", type=click.FloatRange(min=0.01), help="Poll interval in seconds.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535),
              help="Serve Prometheus metrics on this port (needs the metrics extra).")
@click.option("--metrics-addr", default="0.0.0.0", show_default=True,
              help="The address the metrics server listens on.")
def worker(
    app: str,
    concurrency: int | None,
    lease: float | None,
    poll: float | None,
    metrics_port: int | None,
    metrics_addr: str,
) -> None:
    """Run a worker for APP (module:attribute) until SIGINT or SIGTERM.

    TIERS_LOG_FORMAT=json makes its logs JSON lines; TIERS_LOG_LEVEL sets their level.
    """
    retrier = retrier_of(load_app_waiting_for_database(app))
    if metrics_port is not None:
        try:
            from .metrics import serve as serve_metrics
        except ImportError:
            raise click.UsageError(
                "--metrics-port needs prometheus_client: pip install 'durable-tiers[metrics]'"
            ) from None
        serve_metrics(retrier, metrics_port, metrics_addr)
        err_console.print(f"metrics on http://{metrics_addr}:{metrics_port}/metrics")
    options: dict[str, Any] = {}
    if concurrency:
        options["concurrency"] = concurrency
    if lease:
        options["lease"] = timedelta(seconds=lease)
    if poll:
        options["poll_interval"] = timedelta(seconds=poll)
    the_worker = retrier.worker(**options)

    stopped_now = False

    async def on_signals(
        serving: anyio.CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        nonlocal stopped_now
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()  # before the worker starts: no signal may kill it
            async for _ in signals:
                if not the_worker.stopping:
                    err_console.print(
                        "stopping: finishing running work (signal again to stop now)"
                    )
                    the_worker.stop()
                elif not stopped_now:
                    err_console.print(
                        "second signal: stopping now, async work released to other "
                        "workers (signal again to exit at once)"
                    )
                    stopped_now = True
                    serving.cancel()
                else:
                    err_console.print("third signal: exiting at once")
                    os._exit(1)

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            serving = anyio.CancelScope()
            await tg.start(on_signals, serving)
            with serving:
                await the_worker.serve()
            tg.cancel_scope.cancel()

    anyio.run(serve)
    if stopped_now:
        sys.exit(1)  # stopped short: its `def` attempts' runs wait for their leases


@main.command()
@click.option("--db", "db_url", envvar="TIERS_DATABASE_URL", help="Database URL.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8787, show_default=True, type=click.IntRange(1, 65535))
@click.option("--read-only", is_flag=True, help="Show only: no action, no login.")
@click.pass_obj
def dashboard(obj: Context, db_url: str | None, host: str, port: int, read_only: bool) -> None:
    """Serve the web dashboard (needs durable-tiers[dashboard]). Acting needs the token
    in TIERS_DASHBOARD_TOKEN; without it the dashboard only shows."""
    try:
        import uvicorn

        from .dashboard import create_app
    except ImportError as exc:
        raise click.UsageError(
            f"the dashboard needs its extra ({exc.name} is missing): "
            "pip install 'durable-tiers[dashboard]'"
        ) from None
    token = os.environ.get("TIERS_DASHBOARD_TOKEN") or None
    source: Any = db_url or obj.store()
    try:
        app = create_app(source, token=None if read_only else token, read_only=read_only)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if read_only:
        mode = "read-only"
    elif token:
        mode = "log in with TIERS_DASHBOARD_TOKEN to act"
    else:
        mode = "showing only: set TIERS_DASHBOARD_TOKEN to act"
    err_console.print(f"dashboard on http://{host}:{port}/ ({mode})", soft_wrap=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@main.group()
def runs() -> None:
    """Inspect and manage stored runs."""


@runs.command("list")
@click.option("--state", type=click.Choice(["pending", "running", "delivering", "finishing",
                                            "completed"]))
@click.option("--fn", "fn", help="Only runs of this function name.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.pass_obj
def runs_list(obj: Context, state: str | None, fn: str | None, limit: int, as_json: bool) -> None:
    """The most recent runs, newest first."""
    rows = obj.store().list_runs(state=state, fn=fn, limit=limit)
    listing = [
        {
            "id": row.id, "function": row.fn, "state": _state(row), "outcome": row.outcome,
            "tries": row.attempts, "queue": row.queue or None, "created": row.created_ms,
            "error": row.error,
        }
        for row in rows
    ]
    columns = ("id", "function", "state", "tries", "created", "error")
    print_listing(columns, listing, as_json, "run(s)")


@runs.command("show")
@click.argument("run_id")
@click.pass_obj
def runs_show(obj: Context, run_id: str) -> None:
    """One run, with every attempt."""
    store = obj.store()
    row = or_exit(store.get, run_id)
    info = Table(Column(no_wrap=True), Column(overflow="fold"), show_header=False)
    for name, value in [
        ("id", row.id), ("function", row.fn), ("state", _state(row)),
        ("outcome", row.outcome or ""), ("args", str(row.args)),
        ("result", "" if row.result is None else str(row.result)),
        ("error", row.error or ""), ("queue", row.queue or "(retrier)"),
        ("idempotency key", row.idempotency_key or ""), ("debounce key", row.debounce_key or ""),
        ("attempts", str(row.attempts)), ("failures", f"{row.failures} of {row.max_failures}"),
        ("timeout", "" if row.timeout_ms is None else f"{format_limit(row.timeout_ms)} an attempt"),
        ("next due", format_ms(row.due_ms) if row.state == "pending" else ""),
        ("on_complete", row.on_complete or ""), ("handler error", row.handler_error or ""),
        ("created", format_ms(row.created_ms)), ("finished", format_ms(row.finished_ms)),
    ]:
        info.add_row(name, value)
    if row.state != "completed":
        info.add_row("why", or_exit(store.explain, run_id).message)
    console.print(info)
    attempts = Table("#", "outcome", "started", "took", "worker", "error", title="attempts")
    tracebacks: list[tuple[int, str]] = []
    for a in store.attempts(run_id):
        attempts.add_row(
            str(a.number), a.outcome, format_ms(a.started_ms), f"{a.finished_ms - a.started_ms} ms",
            a.worker or "", a.error or "",
        )
        if a.traceback:
            tracebacks.append((a.number, a.traceback))
    console.print(attempts)
    for number, text in tracebacks:
        console.rule(f"attempt {number}: traceback", style="dim")
        console.print(text.rstrip(), markup=False, highlight=False)


@runs.command("why")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def runs_why(obj: Context, run_id: str, as_json: bool) -> None:
    """Why a run is not running: what holds it, and until when."""
    print_why(or_exit(obj.store().explain, run_id), as_json)


def print_why(why: Why, as_json: bool) -> None:
    """Print an `explain` answer, as a sentence or as one JSON object."""
    if as_json:
        click.echo(
            json.dumps(
                {
                    "id": why.run_id,
                    "state": why.state,
                    "reason": why.reason,
                    "message": why.message,
                    "until": why.until.isoformat() if why.until else None,
                    "worker": why.worker,
                    "details": why.details,
                }
            )
        )
        return
    console.print(f"[bold]{why.state}[/] ({why.reason}): {why.message}", highlight=False)


@runs.command("cancel")
@click.argument("run_id")
@click.pass_obj
def runs_cancel(obj: Context, run_id: str) -> None:
    """Cancel a pending or running run."""
    changed = or_exit(obj.store().cancel, run_id)
    console.print("canceled" if changed else "already finished; nothing to cancel")


@runs.command("retry")
@click.argument("run_id")
@click.pass_obj
def runs_retry(obj: Context, run_id: str) -> None:
    """Run a failed run again now (pending, due at once, its retry budget renewed)."""
    or_exit(obj.store().retry, run_id)
    console.print("pending again, due now")


@main.group()
def db() -> None:
    """The database schema: durable-tiers' own migrations (Alembic, in the table
    tiers_alembic_version). A Retrier applies them when it starts; run these in a
    deploy step to migrate first."""


@db.command("upgrade")
@click.option("--branch", "branches", multiple=True,
              help="Only this line of migrations (engine, workflow, ...); default: all.")
@click.pass_obj
def db_upgrade(obj: Context, branches: tuple[str, ...]) -> None:
    """Apply every migration the database lacks (creating its tables if need be)."""
    store = obj.store(create=True)
    migrations = Migrations()
    labels = list(branches or migrations.branches)
    for label in labels:
        if label not in migrations.branches:
            raise click.BadParameter(
                f"no branch {label!r}; installed: {', '.join(migrations.branches)}"
            )
    with err_console.status("migrating..."):
        applied = store.migrate(migrations, labels)
    for revision in applied:
        console.print(f"applied {revision}")
    console.print("up to date" if not applied else f"{len(applied)} migration(s) applied")


@db.command("current")
@click.pass_obj
def db_current(obj: Context) -> None:
    """The revision the database is at, for each line of migrations."""
    migrations = Migrations()
    with obj.store().dialect.read() as conn:
        current = migrations.current(conn)
    heads = migrations.heads()
    table = Table("branch", "revision", "newest known")
    for label in migrations.branches:
        mine = sorted(r for r in current if r.startswith(f"{label}_"))
        newest = sorted(r for r in heads if r.startswith(f"{label}_"))
        table.add_row(label, ", ".join(mine) or "(none)", ", ".join(newest))
    console.print(table)


@db.command("history")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def db_history(as_json: bool) -> None:
    """Every migration this durable-tiers knows, newest first."""
    rows = []
    for script in Migrations().history():
        before = script.down_revision
        follows = before if isinstance(before, str) else ", ".join(before or ())
        rows.append({"revision": script.revision, "follows": follows,
                     "what": (script.doc or "").splitlines()[0]})
    print_listing(("revision", "follows", "what"), rows, as_json, "migration(s)")


@runs.command("cleanup")
@click.argument("run_ids", nargs=-1)
@click.option("--older-than", type=float, default=7.0, show_default=True,
              help="Days since completion (when no RUN_IDS are given).")
@click.pass_obj
def runs_cleanup(obj: Context, run_ids: tuple[str, ...], older_than: float) -> None:
    """Delete finished runs: the given ones, or all completed longer ago than --older-than."""
    store = obj.store()
    if run_ids:
        for run_id in run_ids:
            or_exit(store.delete, run_id)
        console.print(f"deleted {len(run_ids)} run(s)")
        return
    with err_console.status("deleting completed runs..."):
        removed = store.purge_completed(int(older_than * 86_400_000))
    console.print(f"deleted {removed} run(s) completed more than {older_than:g} day(s) ago")


def or_exit(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except TiersError as exc:
        fail(exc)


def _state(row: RunRow) -> str:
    return f"{row.state} (cancel requested)" if row.cancel_requested else row.state


def print_listing(
    columns: Sequence[str], rows: Sequence[Mapping[str, Any]], as_json: bool, noun: str
) -> None:
    """Print a listing: one JSON array of objects (`--json`; times as ISO 8601), or a
    table that stays readable at 80 columns and when piped (long values fold,
    times drop the date's year and milliseconds). `columns` name the keys shown."""
    if as_json:
        click.echo(json.dumps([{k: _json_value(k, v) for k, v in r.items()} for r in rows]))
        return
    narrow = console.width < _WIDE
    shown = [c for c in columns if not (narrow and c in _WIDE_ONLY)]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for name in shown:
        folds = name not in ("id", "state", *_TIMES)
        table.add_column(name, overflow="fold", no_wrap=not folds)
    for r in rows:
        table.add_row(*(_cell(name, r.get(name)) for name in shown))
    console.print(table)
    hidden = [c for c in columns if c not in shown]
    more = f" ({', '.join(hidden)} hidden at this width: --json has everything)" if hidden else ""
    console.print(f"{len(rows)} {noun}{more}")


_TIMES = ("created", "finished", "started", "heartbeat")  # listing keys holding epoch ms
_WIDE = 110  # below this many columns, listings leave out the columns of _WIDE_ONLY
_WIDE_ONLY = ("error",)


def _json_value(key: str, value: Any) -> Any:
    if key in _TIMES and isinstance(value, int):
        return ms_to_datetime(value).isoformat(timespec="milliseconds")
    return value


def _cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name in _TIMES:
        return ms_to_datetime(value).strftime("%m-%d %H:%M:%S") if isinstance(value, int) else ""
    if name == "error":
        return shorten(str(value), 60)
    return str(value)


def format_ms(ms: int | None) -> str:
    return "" if ms is None else ms_to_datetime(ms).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def shorten(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"
