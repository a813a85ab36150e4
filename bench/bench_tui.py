"""Cockpit responsiveness under a log flood: first frame, key-to-frame latency, drain cost and memory.

    python bench/bench_tui.py                  # 2,000 log lines/s for 20 s at 120x40
    python bench/bench_tui.py --rate 5000 --seconds 30 --size 80x24 --check

A feeder thread calls the app's event sink exactly as the engine thread does (LogLine at --rate, a StepMetric
every 25 lines), on top of a recorded session. Meanwhile a key that moves the focus between panes (a visible
change) is pressed every 200 ms; its latency is measured from the press to the first frame composed after the
app handled it. Frames are timestamped where the app hands them to the driver (headless: the terminal write
itself is not included). Memory is the process RSS, sampled once a second after a warm-up.
--check exits 1 when key-to-frame p95 >= 100 ms, the first frame takes >= 1.5 s, RSS grows > 50 MiB or the
screen does not show the newest log line at the end (a view that stops repainting is fast but wrong).
"""

from __future__ import annotations

import argparse
import asyncio
import html
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from textual import events  # noqa: E402

from agent.events import LogLine, StepMetric  # noqa: E402
from tui.app import CockpitApp  # noqa: E402
from tui.demo import demo_header, recorded_session  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def import_seconds() -> float:
    """Seconds for a fresh interpreter to import the cockpit (what `autoresearch` pays before a frame)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tui.app"], cwd=ROOT, check=True)
    return time.perf_counter() - started


class Feeder(threading.Thread):
    """Calls the sink from its own thread at `rate` log lines a second, like a training's output."""

    def __init__(self, sink: Any, rate: int) -> None:
        super().__init__(name="feeder", daemon=True)
        self.sink = sink
        self.rate = rate
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        tick = 0.01
        per_tick = max(1, round(self.rate * tick))
        step = 0
        next_time = time.perf_counter()
        while not self.stop.is_set():
            for _ in range(per_tick):
                self.sent += 1
                if self.sent % 25 == 0:
                    step += 1
                    loss = 2.0 + 1.0 / (1 + step / 50)
                    self.sink(StepMetric(exp_id=7, step=step, loss=loss, tokens_per_s=18000.0))
                    text = f"step {step:5d} | loss {loss:.4f} | lr 3.00e-03 | tok/s 18000 | {step / 9:.1f}s"
                else:
                    text = f"data: shard {self.sent % 97:3d} | tokens {self.sent * 128} | some verbose output"
                self.sink(LogLine(exp_id=7, text=text))
            next_time += tick
            delay = next_time - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                next_time = time.perf_counter()


async def press_keys(
    app: CockpitApp, seconds: float, frames: list[float], handled: list[float], on_second: Any = None
) -> tuple[list[float], list[float]]:
    """Press pane keys every 200 ms for `seconds`: (key -> frame, key -> handled) latencies in seconds."""
    latencies: list[float] = []
    to_handled: list[float] = []
    keys = ["1", "2", "3"]  # each moves the focus to another pane: a visible change, so a frame follows
    started = time.perf_counter()
    next_second = started
    i = 0
    while time.perf_counter() - started < seconds:
        if on_second is not None and time.perf_counter() >= next_second:
            on_second()
            next_second += 1.0
        key = keys[i % len(keys)]
        i += 1
        n_handled = len(handled)
        pressed = time.perf_counter()
        # What a terminal driver does with a key: post it to the app (no Pilot waits in between).
        app.post_message(events.Key(key, key))
        deadline = pressed + 5
        while len(handled) == n_handled and time.perf_counter() < deadline:
            await asyncio.sleep(0.001)
        if len(handled) > n_handled:
            after = handled[n_handled]
            while not (frames and frames[-1] > after) and time.perf_counter() < deadline:
                await asyncio.sleep(0.001)
            frame = next((f for f in frames if f > after), None)
            if frame is not None:
                latencies.append(frame - pressed)
                to_handled.append(after - pressed)
        await asyncio.sleep(0.2)
    return latencies, to_handled


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    width, height = (int(v) for v in args.size.lower().split("x"))
    frames: list[float] = []
    drains: list[float] = []
    handled: list[float] = []
    created = time.perf_counter()
    app = CockpitApp(header=demo_header())

    original_display = app._display

    def display(screen: Any, renderable: Any) -> None:
        if renderable is not None:
            frames.append(time.perf_counter())
        original_display(screen, renderable)

    app._display = display  # type: ignore[method-assign]

    original_drain = app.drain_events

    def drain() -> Any:
        started = time.perf_counter()
        result = original_drain()
        if result is not None:
            drains.append(time.perf_counter() - started)
        return result

    app.drain_events = drain  # type: ignore[method-assign]

    original_show = app.action_show_pane

    def show_pane(key: str) -> None:
        original_show(key)
        handled.append(time.perf_counter())

    app.action_show_pane = show_pane  # type: ignore[method-assign]

    process = psutil.Process()
    rss: list[float] = []
    async with app.run_test(size=(width, height)) as pilot:
        while not frames:
            await asyncio.sleep(0.005)
        first_frame = frames[0] - created
        app.feed(recorded_session())
        await pilot.pause(2.0)  # the recorded session drawn, the plots built
        idle, _ = await press_keys(app, args.idle_seconds, frames, handled)
        feeder = Feeder(app.bridge, args.rate)
        feeder.start()
        await press_keys(app, args.warmup, frames, handled)
        n_frames, n_drains = len(frames), len(drains)
        started = time.perf_counter()
        latencies, to_handled = await press_keys(
            app, args.seconds, frames, handled, lambda: rss.append(process.memory_info().rss / 2**20)
        )
        elapsed = time.perf_counter() - started
        frames_flood, drains_flood = frames[n_frames:], drains[n_drains:]
        # The live pane forward (a small terminal shows one pane) while the flood goes on, so that the check
        # below sees what the last drains drew, not the repaint that a pane change causes.
        app.main.show_pane("live")
        await pilot.pause(0.3)
        feeder.stop.set()
        feeder.join()
        await pilot.pause(0.3)
        log_view = app.main.live.log_view
        shown = log_view.line_count
        # What the screen shows, not what the widget holds: a view that stops repainting is cheap but wrong.
        screen_text = html.unescape(app.export_screenshot()).replace("\xa0", " ")
        visible = log_view.scrollable_content_region.width  # a line wider than the view is cut
        newest_shown = bool(log_view.lines) and log_view.lines[-1][:visible].rstrip() in screen_text
        curve = len(app.state.run.curve.steps)
    return {
        "size": f"{width}x{height}",
        "rate": args.rate,
        "seconds": elapsed,
        "sent": feeder.sent,
        "first_frame_s": first_frame,
        "idle_keys": len(idle),
        "idle_p50_ms": percentile(idle, 50) * 1000,
        "idle_p95_ms": percentile(idle, 95) * 1000,
        "keys": len(latencies),
        "key_p50_ms": percentile(latencies, 50) * 1000,
        "key_p95_ms": percentile(latencies, 95) * 1000,
        "key_max_ms": max(latencies, default=float("nan")) * 1000,
        "handled_p95_ms": percentile(to_handled, 95) * 1000,
        "drains": len(drains_flood),
        "drain_p50_ms": percentile(drains_flood, 50) * 1000,
        "drain_p95_ms": percentile(drains_flood, 95) * 1000,
        "frames_per_s": len(frames_flood) / max(elapsed, 1e-9),
        "rss_start_mib": rss[0] if rss else float("nan"),
        "rss_end_mib": rss[-1] if rss else float("nan"),
        "rss_max_mib": max(rss, default=float("nan")),
        "rss_growth_mib": (rss[-1] - rss[0]) if rss else float("nan"),
        "log_lines_kept": shown,
        "newest_line_shown": newest_shown,
        "curve_points_kept": curve,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=2000, help="log lines per second (default 2000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds of flood (default 20)")
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="seconds of flood before measuring (default 3)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=5.0, help="key presses without a flood first (default 5)"
    )
    parser.add_argument("--size", default="120x40", help="terminal size WxH (default 120x40; try 80x24)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a quality bar is missed")
    args = parser.parse_args()

    imported = import_seconds()
    result = asyncio.run(bench(args))
    print(
        f"cockpit under a log flood: {result['rate']} lines/s for {result['seconds']:.1f} s at {result['size']}"
    )
    print(f"  import tui.app (fresh interpreter)  {imported:8.2f} s")
    print(f"  first frame after App()             {result['first_frame_s']:8.2f} s")
    print(f"  lines sent by the feeder            {result['sent']:8d}")
    print(
        f"  key -> frame, no flood (n={result['idle_keys']})     p50 {result['idle_p50_ms']:6.1f} ms   "
        f"p95 {result['idle_p95_ms']:6.1f} ms"
    )
    print(
        f"  key -> frame, flood (n={result['keys']})      p50 {result['key_p50_ms']:6.1f} ms   "
        f"p95 {result['key_p95_ms']:6.1f} ms   max {result['key_max_ms']:6.1f} ms"
    )
    print(f"  of which key -> handled             p95 {result['handled_p95_ms']:6.1f} ms")
    print(
        f"  drain (events -> widgets, n={result['drains']})  p50 {result['drain_p50_ms']:6.1f} ms   "
        f"p95 {result['drain_p95_ms']:6.1f} ms"
    )
    print(f"  frames composed                     {result['frames_per_s']:8.1f} /s")
    print(
        f"  RSS                                 start {result['rss_start_mib']:.1f} MiB, end "
        f"{result['rss_end_mib']:.1f} MiB, max {result['rss_max_mib']:.1f} MiB "
        f"(growth {result['rss_growth_mib']:+.1f} MiB)"
    )
    print(f"  log lines kept / curve points kept  {result['log_lines_kept']} / {result['curve_points_kept']}")
    print(f"  newest log line on screen           {'yes' if result['newest_line_shown'] else 'NO'}")
    first_frame_total = imported + result["first_frame_s"]
    print(f"  first frame, import included        {first_frame_total:8.2f} s")
    failures = []
    if not result["key_p95_ms"] < 100:
        failures.append(f"key->frame p95 {result['key_p95_ms']:.1f} ms >= 100 ms")
    if not first_frame_total < 1.5:
        failures.append(f"first frame {first_frame_total:.2f} s >= 1.5 s")
    if not result["rss_growth_mib"] < 50:
        failures.append(f"RSS grew {result['rss_growth_mib']:.1f} MiB")
    if not result["newest_line_shown"]:
        failures.append("the log view does not show the newest line")
    if failures:
        print("MISSED: " + "; ".join(failures))
    else:
        print("all quality bars met (key p95 < 100 ms, first frame < 1.5 s, memory flat, log view current)")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
