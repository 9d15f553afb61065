"""The helper threads of :func:`convert_video`: decode ahead, encode behind.

The main thread runs the model; a :class:`ReaderThread` decodes the next frames
meanwhile and a :class:`WriterThread` per output encodes the previous results.
They talk through bounded queues, so at most a few chunks are ever in memory
whatever the length of the video. PyAV releases the GIL while FFmpeg decodes,
scales and encodes, so the threads really overlap. An exception on a helper
thread is re-raised on the main thread;
stopping (an error or Ctrl-C on the main thread) is prompt because every blocking
``put`` wakes up regularly to check a stop flag.

Ctrl-C is taken as a flag (:class:`Interrupts`) and raised as ``KeyboardInterrupt``
only at safe points of the main thread: Python raises it wherever the main thread
is, also between a ``queue.Queue`` lock's acquire and release, which can leave the
lock held and hang the helper threads (seen in tests under load). Other signals that
should stop a run the same way (the command line's SIGTERM) call
:func:`request_interrupt` from their handler.
"""
from __future__ import annotations

import queue
import signal
import threading
from typing import Callable, Iterable

__all__ = ["Interrupts", "ReaderThread", "WriterThread", "request_interrupt"]

_END = object()
_POLL_S = 0.1


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Interrupts:
    """Ctrl-C (SIGINT) as a flag that :meth:`check` raises as ``KeyboardInterrupt``.

    A context manager: while active, on the main thread and where SIGINT still has
    Python's default handler, the signal only sets the flag; a second Ctrl-C raises at
    once. Elsewhere (another thread, a custom handler) it changes nothing, and
    :meth:`check` only reports a flag set by someone calling :meth:`interrupt`.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            _ACTIVE.append(self)  # what request_interrupt() reaches, even where SIGINT is ignored
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if self in _ACTIVE:  # (entered on the main thread)
            _ACTIVE.remove(self)
        return False

    def _handle(self, signum, frame) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: at once
        self._event.set()

    def interrupt(self) -> None:
        """Ask for a stop at the next :meth:`check` (what a Ctrl-C does)."""
        self._event.set()

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a stop was asked for."""
        if self._event.is_set():
            raise KeyboardInterrupt


_NO_INTERRUPTS = Interrupts()  # never entered, never set: check() is a no-op
_ACTIVE: list[Interrupts] = []  # entered on the main thread, innermost last


def request_interrupt() -> None:
    """Stop the run as a Ctrl-C would; for a signal handler (it runs on the main thread).

    Sets the flag of the innermost active :class:`Interrupts` (a second request raises
    ``KeyboardInterrupt`` at once), or raises ``KeyboardInterrupt`` when none is active.
    Unlike re-raising the signal as SIGINT, it works where SIGINT is ignored: a job
    started in the background by a non-interactive shell (``cmd &``) starts with SIGINT
    and SIGQUIT ignored, and ``kill`` must still stop it cleanly.
    """
    if not _ACTIVE:
        raise KeyboardInterrupt
    _ACTIVE[-1]._handle(signal.SIGINT, None)


def _put(q: queue.Queue, item, stop: threading.Event, interrupts: Interrupts = _NO_INTERRUPTS) -> bool:
    """Put ``item`` unless ``stop`` is set first; returns whether it was put.

    On the main thread ``interrupts`` is checked between attempts."""
    while not stop.is_set():
        interrupts.check()
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


class ReaderThread:
    """Iterate ``source`` on a daemon thread, ``maxsize`` items ahead of the consumer.

    Iterating the ``ReaderThread`` yields ``source``'s items in order and re-raises
    its exception, if any, where it happened in the sequence. :meth:`close` stops
    the thread (closing the source's iterator there, on its own thread) and waits.
    """

    def __init__(self, source: Iterable, maxsize: int, interrupts: Interrupts = _NO_INTERRUPTS):
        self._source = source
        self._interrupts = interrupts
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="bimatting-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        iterator = iter(self._source)
        try:
            for item in iterator:
                if not _put(self._queue, item, self._stop):
                    return
            _put(self._queue, _END, self._stop)
        except BaseException as e:  # handed to the consumer, which re-raises it
            _put(self._queue, _Failure(e), self._stop)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # a generator's ``finally`` (closing the container) runs here

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        while True:
            self._interrupts.check()
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                continue
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a thread waiting to put
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(_POLL_S)


class WriterThread:
    """Call ``write(item)`` on a daemon thread for every item :meth:`put` here, in order.

    At most ``maxsize`` items wait. An exception raised by ``write`` stops the
    thread and is re-raised by the next :meth:`put` or by :meth:`finish`.
    """

    def __init__(self, write: Callable[[object], None], maxsize: int = 2, interrupts: Interrupts = _NO_INTERRUPTS):
        self._write = write
        self._interrupts = interrupts
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bimatting-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                self._write(item)
        except BaseException as e:
            self._error = e
            self._stop.set()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item) -> None:
        """Queue ``item`` for writing (blocks while the queue is full)."""
        self._raise_error()
        if not _put(self._queue, item, self._stop, self._interrupts):
            self._raise_error()
            raise RuntimeError("the writer thread has stopped")

    def finish(self) -> None:
        """Wait until everything queued is written; re-raise the writer's exception if any."""
        self.put(_END)
        while self._thread.is_alive():
            self._interrupts.check()
            self._thread.join(_POLL_S)
        self._raise_error()

    def abort(self) -> None:
        """Stop without writing what is still queued, and wait for the thread."""
        self._stop.set()
        self._thread.join()
