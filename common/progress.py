"""Progress bars that stay readable in a log file.

On a terminal: tqdm's bar, redrawn in place. Written to a file or a pipe (a CI log, ``make demo
> log``, a cluster job's output): one plain line every ``LOG_INTERVAL_S`` seconds and one at the
end, instead of a carriage-return frame per step.
"""
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A stream that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` on a terminal; plain lines at a modest interval elsewhere."""
    stream = kwargs.pop("file", None) or sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, file=_Lines(stream), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S * 4,
                ncols=100, ascii=True, **kwargs)
