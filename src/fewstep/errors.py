"""Exception types raised by fewstep: every bad input ends in one of these, never in a silent wrong sample."""


class FewstepError(Exception):
    """Base class of every error fewstep raises on purpose."""


class ScheduleError(FewstepError, ValueError):
    """A time schedule is invalid (too short, not strictly decreasing, non-positive, non-finite)."""


class SolverError(FewstepError, ValueError):
    """An unknown solver, an unknown option, or an option out of range."""


class DenoiserError(FewstepError, RuntimeError):
    """The denoiser returned something unusable (wrong shape, NaN/Inf) or raised."""


class ModelError(FewstepError, ValueError):
    """An unknown built-in model or a model that lacks what an operation needs."""


class ConditionError(FewstepError, ValueError):
    """Bad conditions (--classes, --prompts, --guidance) or a checkpoint made for other conditions."""
