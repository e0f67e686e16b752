"""The job queue: jobs recorded in SQLite, one worker thread per device, taking jobs in arrival order.

Every request that generates (webui's synchronous routes and the native job API alike) becomes a job:
a row in ``jobs`` (its request, state, timings, error and result file names) written when it is queued,
started and finished, so the history survives a restart. On startup a job still marked ``running`` was
cut off by a crash and is marked ``failed``; ``queued`` native jobs are queued again in their order
(their stored request carries the resolved seed, so they make the images they would have made);
queued webui requests are failed, since the client that waited for them is gone.

States: queued -> running -> done | interrupted (webui interrupt: the images so far) | failed | cancelled.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfumato.errors import InvalidParameterError, SfumatoError
from sfumato.server.a1111 import RequestError, Task
from sfumato.server.execute import Control, Outcome, Stop, execute
from sfumato.server.models import AddonDirs, ModelCache, Registry, UnknownNameError

log = logging.getLogger("sfumato.server")

TERMINAL = ("done", "interrupted", "failed", "cancelled")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, api TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, request TEXT NOT NULL,
    error TEXT, error_status INTEGER, result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
"""


@dataclass(eq=False)
class Job(Control):
    """A queued or running job, shared between the worker and the request threads."""

    id: str
    api: str  # "native" | "a1111"
    kind: str
    task: Task
    request: dict[str, Any]
    created: float = field(default_factory=time.time)
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    error_status: int | None = None  # the HTTP status the error maps to (webui routes answer with it)
    outcome: Outcome | None = None
    files: list[str] = field(default_factory=list)
    pass_no: int = 0
    passes: int = 1
    iteration: int = 0
    step: int = 0
    steps: int = 0
    latent: Any = None  # the latest x0 prediction (for previews)
    spec: Any = None
    version: int = 0  # bumped on every change, for event streams
    done: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False
    skipped: bool = False
    cancelled: bool = False

    def on_step(self, pass_no: int, passes: int, iteration: int, info: Any, spec: Any) -> None:
        self.pass_no, self.passes, self.iteration = pass_no, passes, iteration
        self.step, self.steps = info.i + 1, info.total
        self.latent, self.spec = info.denoised, spec
        self.version += 1

    @property
    def progress(self) -> float:
        if self.state in ("done", "interrupted"):
            return 1.0
        if self.state != "running" or self.steps == 0:
            return 0.0
        return min(1.0, (self.pass_no + self.step / self.steps) / max(self.passes, 1))

    def eta(self) -> float:
        """Seconds left, extrapolated from the time so far (webui's ``eta_relative``)."""
        if self.state != "running" or self.started is None or self.progress <= 0:
            return 0.0
        elapsed = time.time() - self.started
        return max(0.0, elapsed / self.progress - elapsed)


class JobStore:
    """The ``jobs`` table (stdlib sqlite3, one connection shared under a lock, WAL journal)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, job: Job) -> None:
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, api, kind, state, created, request) VALUES (?, ?, ?, ?, ?, ?)",
                             (job.id, job.api, job.kind, job.state, job.created, json.dumps(job.request)))

    def update(self, job: Job) -> None:
        result = None
        if job.outcome is not None:
            o = job.outcome
            result = json.dumps({"files": job.files, "infotexts": o.infotexts, "seeds": o.seeds,
                                 "model": o.model_name, "model_hash": o.model_hash})
        with self._lock:
            self._db.execute("UPDATE jobs SET state=?, started=?, finished=?, error=?, error_status=?, result=? "
                             "WHERE id=?", (job.state, job.started, job.finished, job.error, job.error_status,
                                            result, job.id))

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _row(row) if row is not None else None

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in rows]

    def recover(self) -> list[dict[str, Any]]:
        """Mark jobs a crash left running as failed, fail queued webui requests; return the queued native
        jobs (oldest first) to run again."""
        now = time.time()
        with self._lock:
            self._db.execute("UPDATE jobs SET state='failed', finished=?, error_status=500, error="
                             "'the server stopped while this job was running (crash or restart)' "
                             "WHERE state='running'", (now,))
            self._db.execute("UPDATE jobs SET state='failed', finished=?, error_status=503, error="
                             "'the server stopped before this request ran; its client is gone' "
                             "WHERE state='queued' AND api='a1111'", (now,))
            rows = self._db.execute("SELECT * FROM jobs WHERE state='queued' ORDER BY created").fetchall()
        return [_row(r) for r in rows]


def _row(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["request"] = json.loads(d["request"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    return d


def _control_units(task: Task, pipe, cache: ModelCache) -> list:
    """The task's ControlNet units, their models loaded for ``pipe`` and their images preprocessed."""
    if not task.controls:
        return []
    from sfumato.adapters.controlnet import ControlUnit, preprocess

    return [ControlUnit(cache.controlnet(pipe, c.model), preprocess(c.image, c.module, c.threshold_a, c.threshold_b),
                        c.weight, c.start, c.end, name=c.model, mode=c.mode, resize=c.resize, module=c.module)
            for c in task.controls]


def error_status(e: BaseException) -> int:
    """The HTTP status an exception from parsing or running a job maps to."""
    if isinstance(e, RequestError):
        return e.status
    if isinstance(e, UnknownNameError):
        return 400
    if isinstance(e, InvalidParameterError):
        return 422
    return 500


class Scheduler:
    """A FIFO of jobs and one worker thread per device, each with its own :class:`ModelCache`."""

    def __init__(self, store: JobStore, registry: Registry, outputs: Path, *, devices: list[str],
                 dtype: str | None, model_budget: int, parse: Callable[[str, dict], Task],
                 addons: AddonDirs | None = None, memory=None) -> None:  # noqa: ANN001 - MemoryOptions
        self.store, self.registry, self.outputs = store, registry, outputs
        self._parse = parse
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.active: dict[str, Job] = {}  # queued and running jobs
        self.caches = [ModelCache(d, dtype, model_budget, addons, memory) for d in devices]
        self._threads = [threading.Thread(target=self._work, args=(c,), name=f"sfumato-worker-{c.device}",
                                          daemon=True) for c in self.caches]
        self._stopping = False

    def start(self) -> None:
        for row in self.store.recover():
            try:
                task = self._parse(row["kind"], row["request"])
            except SfumatoError as e:
                job = Job(id=row["id"], api=row["api"], kind=row["kind"], task=Task(kind=row["kind"],
                          params=None), request=row["request"], created=row["created"])  # type: ignore[arg-type]
                self._finish(job, "failed", error=f"cannot queue again after a restart: {e}", status=error_status(e))
                continue
            job = Job(id=row["id"], api=row["api"], kind=row["kind"], task=task, request=row["request"],
                      created=row["created"])
            with self._lock:
                self.active[job.id] = job
            self._queue.put(job)
            log.info("queued job %s again after a restart", job.id)
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel running jobs and end the workers; queued jobs stay queued in the store (run after a restart)."""
        self._stopping = True
        with self._lock:
            for job in self.active.values():
                if job.state == "running":
                    job.cancelled = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)

    def submit(self, api: str, kind: str, task: Task, request: dict[str, Any]) -> Job:
        job = Job(id=secrets.token_hex(8), api=api, kind=kind, task=task,
                  request={**request, "seed": task.params.seed})
        with self._lock:
            self.active[job.id] = job
        self.store.insert(job)
        self._queue.put(job)
        return job

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self.active.values() if j.state == "running"]

    def queued_count(self) -> int:
        with self._lock:
            return sum(j.state == "queued" for j in self.active.values())

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.active.get(job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it is not active."""
        job = self.get(job_id)
        if job is None:
            return False
        job.cancelled = True
        job.version += 1
        if job.state == "queued":  # the worker drops it when it comes up
            self._finish(job, "cancelled")
        return True

    def _work(self, cache: ModelCache) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stopping:
                return
            if job.done.is_set():  # cancelled while queued
                continue
            job.state, job.started = "running", time.time()
            job.version += 1
            self.store.update(job)
            try:
                task = job.task
                pipe = refiner = None
                held = []
                if task.kind != "extras":  # extras runs upscalers only
                    held.append(self.registry.find(task.model, upscaler=task.kind == "upscale"))
                    pipe = cache.get(held[0])
                if task.refiner is not None:
                    refiner = cache.get(self.registry.find(task.refiner), share_with=held[0])
                upscalers = {}
                for name in task.upscalers:
                    held.append(self.registry.find(name, upscaler=True))
                    upscalers[name] = cache.get(held[-1], in_use=tuple(held[:-1]))
                controls = _control_units(task, pipe, cache) if pipe is not None else []
                job.outcome = execute(task, pipe, refiner, job, controls=controls, upscalers=upscalers)
                job.files = self._save(job)
                self._finish(job, job.outcome.state)
            except Stop:
                self._finish(job, "cancelled")
            except Exception as e:  # noqa: BLE001 - a failed job must not stop the worker
                if not isinstance(e, SfumatoError):
                    log.error("job %s failed:\n%s", job.id, traceback.format_exc())
                self._finish(job, "failed", error=str(e) or type(e).__name__, status=error_status(e))

    def _save(self, job: Job) -> list[str]:
        """Native jobs keep their images (``<outputs>/<job id>/<i>.png``); webui requests only with
        ``save_images``. Returns the paths relative to the outputs folder."""
        from sfumato.images import save_image, save_numbered

        o = job.outcome
        if job.api == "native":
            return [str(save_image(im, self.outputs / job.id / f"{i}.png", parameters=text,
                                   overwrite=True).relative_to(self.outputs))
                    for i, (im, text) in enumerate(zip(o.images, o.infotexts))]
        if job.task.save:
            folder = self.outputs / f"{job.kind}-images"
            return [str(save_numbered(im, folder, seed, parameters=text).relative_to(self.outputs))
                    for im, text, seed in zip(o.images, o.infotexts, o.seeds)]
        return []

    def _finish(self, job: Job, state: str, *, error: str | None = None, status: int | None = None) -> None:
        # The terminal state, the stored row and leaving ``active`` change together under the lock,
        # so a reader never sees a finished job without its stored result (views of a job in a
        # terminal state read the store).
        try:
            with self._lock:
                job.state, job.finished, job.error, job.error_status = state, time.time(), error, status
                job.latent = None
                job.version += 1
                try:
                    self.store.update(job)
                finally:
                    self.active.pop(job.id, None)
        finally:
            job.done.set()
