"""Celery tasks for taskwire's Celery adapter tests (server/tests/celery.rs).

The worker is configured the way docs/celery.md asks: JSON only, a Redis
result backend, and `task_track_started` so a running task reads STARTED.
The broker and the result backend come from the environment.
"""

import os
import time

from celery import Celery

app = Celery(
    "tasks",
    broker=os.environ["TASKWIRE_CELERY_BROKER"],
    backend=os.environ["TASKWIRE_CELERY_RESULT_BACKEND"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_track_started=True,
    # One task at a time per process, so a second one waits in the queue.
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


@app.task(bind=True)
def count(self, n, step_ms=50):
    """Counts to `n`, reporting progress the celery-progress way."""
    for i in range(n):
        self.update_state(
            state="PROGRESS",
            meta={"current": i, "total": n, "description": f"counted {i}"},
        )
        time.sleep(step_ms / 1000)
    return n


@app.task
def fail(reason="boom"):
    raise ValueError(f"cannot do it: {reason}")


@app.task
def sleep(seconds=30):
    """A long task to revoke; checks the clock often so SIGTERM lands fast."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
    return "slept"
