"""The cockpit's screens: main, welcome, review, editors, model picker, trainers, help and quit."""

from tui.screens.dialogs import QuitScreen, TrainersScreen, VetoScreen, WelcomeScreen
from tui.screens.editors import ProgramEditorScreen, ProposalEditorScreen
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen
from tui.screens.models import ModelChoice, ModelPickerScreen
from tui.screens.review import ReviewScreen

__all__ = [
    "HelpScreen",
    "MainScreen",
    "ModelChoice",
    "ModelPickerScreen",
    "ProgramEditorScreen",
    "ProposalEditorScreen",
    "QuitScreen",
    "ReviewScreen",
    "TrainersScreen",
    "VetoScreen",
    "WelcomeScreen",
]
