"""A run's output as the engine keeps it: split into lines, stored capped (head and tail), streamed as events.

Lines go to run.log up to a cap (a flood keeps the first part and the last lines), the last ones stay in memory
(the summary block, a traceback), and each becomes a `LogLine` event (a progress line also a `StepMetric`).
"""

from __future__ import annotations

from collections import deque

from agent.events import EventSink, LogLine, StepMetric
from agent.sandbox.spec import RunSpec
from agent.sandbox.summary import parse_progress

MAX_LINE_BYTES = 64 * 1024
"""A longer run of output without a newline is cut into lines of this size."""
TAIL_LINES = 400
"""Lines kept in memory to find the summary block and the traceback."""
LOG_TAIL_LINES = 40
"""Lines of output stored with the experiment (the traceback tail of a crash)."""


class CappedOutput:
    """Splits the child's bytes into lines, writes the capped log, keeps the tail and emits events."""

    def __init__(self, spec: RunSpec, emit: EventSink) -> None:
        self.spec = spec
        self.emit = emit
        self.file = spec.log_path.open("w", encoding="utf-8", errors="replace")
        self.pending = b""
        self.prev_cr = False
        self.cr_line: str | None = None
        """A `\\r` progress line not yet final: written to the log only if nothing overwrites it."""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.fail_line: str | None = None
        tail_budget = min(spec.log_cap_bytes // 4, 256 * 1024)
        self.head_budget = spec.log_cap_bytes - tail_budget
        self.tail_budget = tail_budget
        self.written = 0
        self.truncated = False
        self.dropped = 0
        self.file_tail: deque[str] = deque()
        self.file_tail_bytes = 0
        self.prefix = ""
        """Set for the judge's lines: they are shown and stored, never parsed as the run's progress or FAIL."""

    def feed(self, data: bytes, eof: bool = False) -> None:
        self.pending += data
        buf = self.pending
        start = 0
        while True:
            cut = min((i for i in (buf.find(b"\n", start), buf.find(b"\r", start)) if i >= 0), default=-1)
            if cut < 0:
                if len(buf) - start > MAX_LINE_BYTES:
                    self._line(buf[start : start + MAX_LINE_BYTES], cr=False)
                    start += MAX_LINE_BYTES
                    continue
                break
            if buf[cut : cut + 1] == b"\r":
                if cut + 1 == len(buf) and not eof:
                    break  # a \r at the end of a chunk may be the start of \r\n
                if buf[cut + 1 : cut + 2] == b"\n":
                    self._line(buf[start:cut], cr=False)
                    start = cut + 2
                    continue
                self._line(buf[start:cut], cr=True)
            else:
                self._line(buf[start:cut], cr=False)
            start = cut + 1
        self.pending = buf[start:]
        if eof:
            if self.pending:
                self._line(self.pending, cr=False)
                self.pending = b""
            if self.cr_line is not None:
                self._write(self.cr_line)
                self.cr_line = None

    def _line(self, raw: bytes, cr: bool) -> None:
        text = raw.decode("utf-8", errors="replace")
        if self.prefix and text:
            text = self.prefix + text
        if not text:
            if not cr and self.prev_cr:
                # A newline after a \r line: the progress line stays on screen, it is final.
                if self.cr_line is not None:
                    self._write(self.cr_line)
                    self.cr_line = None
                self.prev_cr = False
            return  # a bare \r (tqdm starts lines with one) overwrites nothing yet
        replace = self.prev_cr
        self.prev_cr = cr
        if replace and self.tail:
            self.tail[-1] = text[:4096]
        else:
            self.tail.append(text[:4096])
        if self.fail_line is None and not self.prefix and text.lstrip().startswith("FAIL"):
            self.fail_line = text.strip()
        if cr:
            self.cr_line = text
        else:
            self.cr_line = None
            self._write(text)
        if not self.truncated:
            self.emit(LogLine(exp_id=self.spec.exp_id, text=text, replace=replace))
        if not self.prefix and (progress := parse_progress(text)):
            self.emit(
                StepMetric(
                    exp_id=self.spec.exp_id,
                    step=progress.step,
                    loss=progress.loss,
                    tokens_per_s=progress.tokens_per_s,
                )
            )

    def _write(self, text: str) -> None:
        line = text + "\n"
        size = len(line.encode("utf-8", errors="replace"))
        if not self.truncated and self.written + size <= self.head_budget:
            self.file.write(line)
            self.written += size
            return
        if not self.truncated:
            self.truncated = True
            self.emit(
                LogLine(
                    exp_id=self.spec.exp_id,
                    text=f"[output over the log cap of {self.spec.log_cap_bytes} bytes: "
                    "run.log keeps the first part and the last lines]",
                )
            )
        size = min(size, self.tail_budget)
        self.file_tail.append(line[: self.tail_budget])
        self.file_tail_bytes += size
        while self.file_tail_bytes > self.tail_budget and self.file_tail:
            dropped = self.file_tail.popleft()
            dropped_size = len(dropped.encode("utf-8", errors="replace"))
            self.file_tail_bytes -= dropped_size
            self.dropped += dropped_size

    def close(self) -> None:
        if self.truncated:
            self.file.write(f"[... {self.dropped} bytes of output dropped: over the log cap ...]\n")
            self.file.writelines(self.file_tail)
        self.file.close()

    def log_tail(self) -> str:
        text = "\n".join(list(self.tail)[-LOG_TAIL_LINES:])
        return text[-8192:]
