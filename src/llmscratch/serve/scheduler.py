"""The server's decoding threads: requests decoded as rows of the engine's ragged batches.

`Engine.run` (in `engine`) queues each admitted request as a `Job` in the engine's inbox;
`Scheduler` threads take them out and decode them with the decoding engine's
`BatchDecoder` (`decoding.batching`), sending each request its text as `Event`s. The
batching engine runs one scheduler of `max_batch_size` rows, the unbatched one
`max_concurrency` schedulers of one row.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Literal

from ..decoding.batching import DecodeRow
from ..decoding.sampling import Sampling

log = logging.getLogger("llmscratch.serve")


@dataclass
class SamplingParams:
    """What one request asks of the decoder (already validated)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1  # choices: rows of the same prompt (choice i samples with seed + i)


@dataclass
class Event:
    """One message from the decoding thread: a text piece, the end of a choice, or a failure
    (which ends every choice of the request)."""

    kind: Literal["text", "done", "error"]
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    index: int = 0  # the choice (0 unless n > 1)


@dataclass(eq=False)
class Job:
    """One admitted request, as the scheduler thread sees it."""

    ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event
    on_retired: Callable[[], None]  # called once, when no row of it is decoding any more
    rows: list[DecodeRow] = field(default_factory=list)


class Scheduler:
    """One decoding thread: it decodes the requests it takes from the engine's inbox as the
    rows of its own `BatchDecoder` (`rows` of them).

    Requests wait in the engine's `inbox` (first in, first out; one waits until some
    scheduler has free rows for all its `n` choices, and nobody overtakes it). Between two
    tokens the thread drops the rows of cancelled requests, prefills the newcomers (a prompt
    longer than the engine's `prefill_chunk` a chunk per step, inside `step`), takes one
    `BatchDecoder.step` and hands every row's text piece to its request. A failing forward
    pass fails the requests whose rows were in it (a 500 each) and the thread keeps serving.
    """

    def __init__(self, engine, rows: int, name: str):
        """`engine`: the serving `engine.Engine` (its `decoding` engine, `inbox`, `cond`,
        `stopping` and `cancel_all`); `rows`: the batch's rows; `name`: the thread's."""
        self.engine = engine
        # chunked prefill only pays where other rows wait: a one-row scheduler prefills at once
        self.decoder = engine.decoding.batch(rows, engine.prefill_chunk if rows > 1 else None,
                                             engine.context_shift)
        self.jobs: list[Job] = []  # admitted into this scheduler's batch
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        eng = self.engine
        while True:
            with eng.cond:
                while not eng.inbox and not self.jobs and not eng.stopping:
                    eng.cond.wait()
                if eng.stopping:
                    break
                new = self._take()
            try:
                self._drop_cancelled()
                if new:
                    self._admit(new)
                if self.decoder.active:
                    self._deliver(self.decoder.step())
            except Exception as e:  # every request in the pass fails; the server keeps serving
                log.exception("generation failed")
                self._fail(list(self.jobs), e)
        for job in list(self.jobs):  # shutting down: end every stream
            self._end(job, "cancelled")
        with eng.cond:
            while eng.inbox:
                self._end(eng.inbox.popleft(), "cancelled")

    def _take(self) -> list[Job]:
        """The jobs at the head of the inbox that fit into the free rows (FIFO)."""
        new, free, inbox = [], self.decoder.free, self.engine.inbox
        while inbox:
            job = inbox[0]
            if job.cancelled.is_set():
                inbox.popleft()
                self._retire(job)
                continue
            if job.params.n > free:
                break
            free -= job.params.n
            new.append(inbox.popleft())
        return new

    def _admit(self, new: list[Job]) -> None:
        """Prefill the new jobs' rows (one pass); a job that fails alone fails alone."""
        dec, ready = self.engine.decoding, []
        for job in new:
            p = job.params
            try:
                job.rows = [dec.row(job.ids, p.max_tokens,
                                    Sampling(p.temperature, p.top_k, p.top_p, None if p.seed is None else p.seed + i),
                                    dec.eos_id, p.stop, tag=(job, i))
                            for i in range(p.n)]
            except Exception as e:  # e.g. a sampling setting the request checks let through
                self._fail([job], e)
                continue
            ready.append(job)
        try:
            self.decoder.add([r for job in ready for r in job.rows])
        except Exception as e:
            log.exception("prefill failed")
            self._fail(ready, e)
            return
        self.jobs.extend(ready)

    def _deliver(self, events) -> None:
        finished, failed = [], []
        for row, _, piece in events:
            job, i = row.tag
            if job in failed:
                continue
            if row.error is not None:  # this request's draw failed: it alone ends (a 500)
                failed.append(job)
                self._fail([job], RuntimeError(row.error))
                continue
            if piece:
                job.emit(Event("text", piece, index=i))
            if row.done:
                job.emit(Event("done", finish_reason=row.finish_reason, completion_tokens=row.n_tokens, index=i))
                if all(r.done for r in job.rows) and job not in finished:
                    finished.append(job)
        for job in finished:
            if job in failed:
                continue
            self.jobs.remove(job)
            self._retire(job)

    def _drop_cancelled(self) -> None:
        gone = self.engine.cancel_all.is_set()
        for job in [j for j in self.jobs if gone or j.cancelled.is_set()]:
            self._end(job, "cancelled")

    def _end(self, job: Job, reason: str) -> None:
        """Take a job's rows out of the batch and tell its client it ended (`reason`)."""
        for i, row in enumerate(job.rows):
            if not row.done:
                self.decoder.cancel(row)
                job.emit(Event("done", finish_reason=reason, completion_tokens=row.n_tokens, index=i))
        if not job.rows:
            job.emit(Event("done", finish_reason=reason))
        if job in self.jobs:
            self.jobs.remove(job)
        self._retire(job)

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        for job in jobs:
            for row in job.rows:
                if row.finish_reason is None:
                    row.finish_reason = "error"
                self.decoder.cancel(row)
            job.emit(Event("error", text=f"generation failed: {type(e).__name__}: {e}"))
            if job in self.jobs:
                self.jobs.remove(job)
            self._retire(job)

    @staticmethod
    def _retire(job: Job) -> None:
        try:
            job.on_retired()
        except RuntimeError:  # the event loop is closed: the server is going down
            pass
