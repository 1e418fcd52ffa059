"""Named AMED training recipes: the paper's two (docs/maths.md §8) and this project's improved ones.

The improved recipes change three things, each measured in benchmarks/amed_bench.py: a far more accurate
teacher (DEIS-tAB order 4 with M = 15 inserted points instead of Heun/iPNDM with M = 1–2: distilling a teacher
that is itself far off caps the student), an end-to-end term on the final state added to the paper's
per-interval loss, and a wider direction-scale bound s_dir = 0.1. The `-gits` recipes also replace the fixed
main grid by a GITS schedule searched for the model, which AMED then refines with its learned points.
"""

from __future__ import annotations

from typing import Any

from ..errors import FewstepError
from ..solvers import get_solver, num_steps_for_nfe
from .solver import AMEDPlugin
from .train import TrainConfig

_FINE_TEACHER: dict[str, Any] = {"teacher": "deis", "teacher_options": {"max_order": 4}, "M": 15}

RECIPES: dict[str, dict[str, Any]] = {
    "paper-solver": dict(student="amed", teacher="heun", M=1, schedule="time_uniform", rho=1.0, afs=True,
                         scale_dir=0.01, scale_time=0.0),
    "paper-plugin": dict(student="ipndm", student_options={"max_order": 4}, teacher="ipndm",
                         teacher_options={"max_order": 4}, M=2, schedule="polynomial", rho=7.0, afs=True,
                         scale_dir=0.01, scale_time=0.2),
    "solver": dict(student="amed", schedule="time_uniform", rho=1.0, afs=True, scale_dir=0.1, scale_time=0.0,
                   loss="step+e2e", **_FINE_TEACHER),
    "plugin-ipndm": dict(student="ipndm", student_options={"max_order": 4}, schedule="polynomial", rho=7.0,
                         afs=True, scale_dir=0.1, scale_time=0.2, loss="step+e2e", **_FINE_TEACHER),
    "plugin-deis": dict(student="deis", student_options={"max_order": 3}, schedule="time_uniform", rho=2.0,
                        afs=True, scale_dir=0.1, scale_time=0.2, loss="step+e2e", **_FINE_TEACHER),
    # the same on a GITS schedule (searched for the model and N): the main grid learned too
    "plugin-ipndm-gits": dict(student="ipndm", student_options={"max_order": 4}, schedule="gits", rho=None,
                              afs=True, scale_dir=0.1, scale_time=0.2, loss="e2e", **_FINE_TEACHER),
    "plugin-deis-gits": dict(student="deis", student_options={"max_order": 3}, schedule="gits", rho=None,
                             afs=True, scale_dir=0.1, scale_time=0.2, loss="step+e2e", **_FINE_TEACHER),
}


def recipe(name: str, nfe: int, final_denoise: bool = False, **overrides: Any) -> TrainConfig:
    """The TrainConfig of a named recipe for an NFE budget (`final_denoise`: the model's runs end with one more
    call, a flow model's step to t = 0). Two calls per interval means AFS recipes hit NFEs of one parity; for the
    other the recipe runs without AFS."""
    if name not in RECIPES:
        raise FewstepError(f"unknown AMED recipe {name!r}; choose one of {', '.join(RECIPES)}")
    fields = {**RECIPES[name], **overrides}
    fields["student_options"] = dict(fields.get("student_options", {}))
    plugin = AMEDPlugin(get_solver(fields["student"], **fields["student_options"]))
    steps = num_steps_for_nfe(plugin, nfe, afs=fields.get("afs", False), denoise_to_zero=final_denoise)
    if steps is None and fields.get("afs") and "afs" not in overrides:
        fields["afs"] = False
        steps = num_steps_for_nfe(plugin, nfe, denoise_to_zero=final_denoise)
    if steps is None:
        raise FewstepError(f"recipe {name!r} cannot use exactly {nfe} NFE (AFS={fields.get('afs', False)})")
    return TrainConfig(num_steps=steps, **fields)
