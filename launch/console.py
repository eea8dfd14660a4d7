"""A quiet console for runs on Ray: the user sees our lines (what starts, progress, evaluations, checkpoint
commits, warnings, the summary); Ray's and DeepSpeed's own output, the workers' included (Ray forwards their
stdout and stderr to the driver), goes to a log file under --out, and to the console too with `-v`.

Lines are told apart by their logger: ours come from `guidedmix.*` loggers, formatted by LOG_FORMAT in the
driver and in every worker, so a forwarded worker line reads `(RayTrainWorker pid=N) <time> guidedmix.train
INFO ...`. Output of this process that is not a log line (tqdm bars, the result printed at the end) passes.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time

from shards.storage import Storage, local_path

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
_LOG_LINE = re.compile(_TIMESTAMP)
_OURS = re.compile(_TIMESTAMP + r" guidedmix[\w.]* [A-Z]+ ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FORWARDED = re.compile(r"\(\w+ pid=\d+[^)]*\) ")  # Ray's prefix on a worker's or actor's line
_LINE_END = re.compile(r"(?<=[\n\r])")


def for_the_user(line: str) -> bool:
    """Whether a line of output belongs on the quiet console."""
    text = _ANSI.sub("", line).lstrip()
    forwarded = _FORWARDED.match(text)
    if forwarded:
        return bool(_OURS.match(text[forwarded.end():]))
    return bool(_OURS.match(text)) or not _LOG_LINE.match(text)


class _LogFile:
    """The log file, opened at the first line written: a command refused before anything ran leaves none.
    The first line held back from the console says where the rest is."""

    def __init__(self, path: str, url: str, console, verbose: bool):
        self.path, self.url, self.console, self.verbose, self.file = path, url, console, verbose, None

    def write(self, piece: str, shown: bool) -> None:
        if self.file is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.file = open(self.path, "a", buffering=1)
        if self.console is not None and (self.verbose or not shown):
            also = "" if self.verbose else " (-v shows it here too)"
            announce = f"guidedmix: full log, with Ray's and DeepSpeed's output: {self.url}{also}\n"
            self.console.write(announce)
            self.file.write(announce)
            self.console = None
        self.file.write(_ANSI.sub("", piece))  # a file is no terminal: no colour codes

    def close(self) -> bool:
        """Whether anything was written."""
        if self.file is None:
            return False
        self.file.close()
        return True


class _Router(io.TextIOBase):
    """A text stream that writes everything to the log file and the lines for the user to the console."""

    def __init__(self, console, logfile: _LogFile, verbose: bool):
        self.console, self.logfile, self.verbose, self.pending = console, logfile, verbose, ""

    def write(self, text: str) -> int:
        self.pending += text
        pieces = _LINE_END.split(self.pending)  # a tqdm bar redraws with \r: each redraw is a piece
        self.pending = pieces.pop()
        for piece in pieces:
            shown = self.verbose or for_the_user(piece)
            self.logfile.write(piece, shown)
            if shown:
                self.console.write(piece)
        return len(text)

    def flush(self) -> None:
        self.console.flush()

    def isatty(self) -> bool:  # tqdm draws a live bar on a terminal and plain lines in a log
        return self.console.isatty()

    @property
    def encoding(self):
        return self.console.encoding


@contextlib.contextmanager
def quiet(out: Storage, verbose: bool):
    """Route this process's stdout and stderr (and the logging handlers already writing to them) through the
    filter while the block runs. The log file is `<out>/logs/console-<time>.log`; where --out is not a local
    folder it is written locally first and copied there at the end."""
    name = f"console-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_storage = out.at("logs", name)
    url = log_storage.url
    remote = local_path(url) is None
    path = os.path.join(tempfile.mkdtemp(prefix="guidedmix-log-"), name) if remote else local_path(url)
    real = sys.stdout, sys.stderr
    if not real[1].isatty():  # Ray colours the prefix of the workers' lines it forwards, terminal or not
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    logfile = _LogFile(path, url, real[1], verbose)
    routers = _Router(real[0], logfile, verbose), _Router(real[1], logfile, verbose)
    handlers = _stream_handlers(real)
    sys.stdout, sys.stderr = routers
    for handler in handlers:
        handler.setStream(routers[handler.stream is real[1]])
    try:
        yield
    finally:
        for router in routers:
            if router.pending:
                router.write("\n")
            router.flush()
        sys.stdout, sys.stderr = real
        for handler in handlers:
            handler.setStream(real[1] if handler.stream is routers[1] else real[0])
        if logfile.close() and remote:
            with open(path, "rb") as f:
                log_storage.write(f.read())
        if remote:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _stream_handlers(streams) -> list:
    """Every logging handler writing to one of `streams`: Ray's logger made its own at import."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    return list({id(h): h for lg in loggers for h in getattr(lg, "handlers", [])
                 if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in streams}.values())
