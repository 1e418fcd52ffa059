"""fewstep: sample pretrained diffusion models in 3–10 steps (AMED and the classic fast ODE solvers)."""

from . import models
from .api import nfe, num_steps_for_nfe, sample
from .errors import DenoiserError, FewstepError, ModelError, ScheduleError, SolverError
from .learned import load_solver
from .schedules import check_schedule, get_schedule
from .solvers import SOLVERS

from .version import __version__

__all__ = [
    "SOLVERS", "DenoiserError", "FewstepError", "ModelError", "ScheduleError", "SolverError",
    "check_schedule", "get_schedule", "load_solver", "models", "nfe", "num_steps_for_nfe", "sample",
]
