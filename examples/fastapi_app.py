"""The realistic entry point: a web app that enqueues from a request handler.

    pip install 'durable-tiers[examples]'
    uvicorn examples.fastapi_app:app            # worker runs inside the app
    # or run workers separately:  tiers worker examples.fastapi_app:retrier

    curl -X POST localhost:8000/signups -H 'content-type: application/json' \\
         -d '{"email": "ann@example.com"}'
    curl localhost:8000/runs/<run_id>

The signup row and its welcome-email run are written in one transaction, so a
failed signup never sends an email, and a committed one always does (with retries).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlmodel import Field, Session, SQLModel

from retrier import Completed, Failed, Retrier, RunNotFound, Success

retrier = Retrier(os.environ.get("TIERS_DATABASE_URL", "sqlite:///tiers.db"))


class Signup(SQLModel, table=True):
    __tablename__ = "example_signups"
    id: int | None = Field(default=None, primary_key=True)
    email: str


SQLModel.metadata.create_all(retrier.engine, tables=[Signup.__table__])  # type: ignore[list-item]


@retrier.action
async def send_welcome_email(email: str) -> dict[str, str]:
    # A real app would call its email provider here; failures are retried.
    return {"sent_to": email}


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    if os.environ.get("TIERS_IN_PROCESS_WORKER", "1") == "1":
        async with retrier:  # an in-process worker for the app's lifetime
            yield
    else:
        yield


app = FastAPI(lifespan=lifespan)


class SignupIn(BaseModel):
    email: str


@app.post("/signups", status_code=201)
def create_signup(body: SignupIn) -> dict[str, Any]:
    with Session(retrier.engine) as session:
        signup = Signup(email=body.email)
        session.add(signup)
        session.flush()
        run_id = retrier.run(send_welcome_email, {"email": body.email}, session=session)
        session.commit()
        return {"signup_id": signup.id, "run_id": run_id}


@app.get("/runs/{run_id}")
def run_status(run_id: str) -> dict[str, Any]:
    try:
        status = retrier.status(run_id)
    except RunNotFound:
        raise HTTPException(404, f"no run {run_id}") from None
    if not isinstance(status, Completed):
        return {"state": "in_progress"}
    result = status.result
    body: dict[str, Any] = {"state": "completed", "outcome": result.kind}
    if isinstance(result, Success):
        body["value"] = result.value
    elif isinstance(result, Failed):
        body["error"] = result.error
    return body
