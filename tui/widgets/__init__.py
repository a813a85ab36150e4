"""The cockpit's widgets: header, timeline, live run, proposal and progress panes."""

from tui.widgets.header import CockpitHeader
from tui.widgets.live import LivePane, LossPlot, RunLog
from tui.widgets.progress import ProgressGains, ProgressPlot
from tui.widgets.proposal import ProposalPane
from tui.widgets.timeline import Timeline
from tui.widgets.trainers import TrainerList

__all__ = [
    "CockpitHeader",
    "LivePane",
    "LossPlot",
    "ProgressGains",
    "ProgressPlot",
    "ProposalPane",
    "RunLog",
    "Timeline",
    "TrainerList",
]
