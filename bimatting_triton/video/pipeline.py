"""The helper threads of :func:`convert_video`: decode ahead, encode behind.

The main thread runs the model; a :class:`ReaderThread` decodes the next frames
meanwhile and a :class:`WriterThread` per output encodes the previous results.
They talk through bounded queues, so at most a few chunks are ever in memory
whatever the length of the video. PyAV releases the GIL while FFmpeg decodes,
scales and encodes, so the threads really overlap. An exception on a helper
thread is re-raised on the main thread;
stopping (an error or Ctrl-C on the main thread) is prompt because every blocking
``put`` wakes up regularly to check a stop flag.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable

__all__ = ["ReaderThread", "WriterThread"]

_END = object()
_POLL_S = 0.1


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; returns whether it was put."""
    while not stop.is_set():
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

    def __init__(self, source: Iterable, maxsize: int):
        self._source = source
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
        item = self._queue.get()
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

    def __init__(self, write: Callable[[object], None], maxsize: int = 2):
        self._write = write
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
        if not _put(self._queue, item, self._stop):
            self._raise_error()
            raise RuntimeError("the writer thread has stopped")

    def finish(self) -> None:
        """Wait until everything queued is written; re-raise the writer's exception if any."""
        self.put(_END)
        self._thread.join()
        self._raise_error()

    def abort(self) -> None:
        """Stop without writing what is still queued, and wait for the thread."""
        self._stop.set()
        self._thread.join()
