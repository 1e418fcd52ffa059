"""The four fewstep nodes, in ComfyUI's node API (`NODE_CLASS_MAPPINGS`).

ComfyUI is imported only when a node runs (`comfy.samplers.KSAMPLER` wraps every SAMPLER), so this module
imports without it. Inputs a node can check on their own (an option out of range, a missing folder, a bad
schedule argument) fail ComfyUI's validation with one line (`VALIDATE_INPUTS`) before anything runs; what needs
the model (a card for another model family or size) fails the node with one line (`NodeError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import FewstepError, ScheduleError, SolverError
from ..flow import parse_flow_arg
from ..frames import get_frame
from ..integrations.kdiffusion import sample_learned
from ..methods import parse_options
from ..solvers import SOLVERS, get_solver
from . import bridge
from .bridge import NodeError

DRIVER_OPTIONS = ("afs", "thresholding", "threshold_ratio")
KINDS = {"edm": "a diffusion (EDM-frame)", "flow": "a flow-matching"}  # a frame in `_check_frame`'s message
SAMPLER, SIGMAS = "Fewstep Sampler", "Fewstep Sigmas"
CARD, AMED = "Fewstep Card", "Fewstep AMED"


def ksampler(function: Any) -> Any:
    """ComfyUI's KSAMPLER around a k-diffusion sampler function (it handles noise scaling, denoise masks and the
    preview callback around the call)."""
    try:
        import comfy.samplers
    except ImportError as e:
        raise ImportError("the fewstep nodes run inside ComfyUI: `comfy` is not importable here") from e
    return comfy.samplers.KSAMPLER(function)


def sampler_options(solver: str, max_order: int = 0, afs: bool = False, options: str = "") -> dict[str, Any]:
    """The Fewstep Sampler's inputs as k-diffusion sampler options, validated: the solver's own options
    (`max_order` 0 = its default; `options` 'key=value, …', e.g. 'deis_mode=rhoab', 'variant=bh1', 'r=0.4',
    'lower_order_final=false') plus afs, thresholding and threshold_ratio."""
    if solver not in SOLVERS:
        raise SolverError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    parsed = parse_options((options or "").replace(";", ",").split(","))
    if max_order:
        if "max_order" in parsed and parsed["max_order"] != max_order:
            raise SolverError(f"max_order is {max_order} but the options say max_order={parsed['max_order']}")
        parsed["max_order"] = max_order
    driver = {k: parsed.pop(k) for k in DRIVER_OPTIONS if k in parsed}
    for key in ("afs", "thresholding"):
        if not isinstance(driver.get(key, False), bool):
            raise SolverError(f"option {key} must be true or false, got {driver[key]!r}")
    ratio = driver.get("threshold_ratio", 0.995)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise SolverError(f"option threshold_ratio must lie in (0, 1], got {ratio!r}")
    get_solver(solver, **parsed)  # unknown options, values out of range
    driver["afs"] = bool(afs or driver.get("afs", False))
    return {**parsed, **driver}


def _message(node: str, check: Any, *args: Any) -> bool | str:
    """VALIDATE_INPUTS's answer: True, or the one-line error of `check(*args)`."""
    if any(a is None for a in args):  # a linked input: its value is not known before the run
        return True
    try:
        check(*args)
    except FewstepError as e:
        return str(NodeError(node, e))
    return True


def _model_sampling(node: str, model: Any) -> Any:
    sampling = bridge.model_sampling_of(model)
    if sampling is None:
        raise NodeError(node, "the connected MODEL has no model_sampling (not a ComfyUI diffusion model)")
    return sampling


def _folder(node: str, path: str, what: str) -> Path:
    folder = Path(str(path).strip()).expanduser()
    if not str(path).strip():
        raise NodeError(node, f"give the {what} folder")
    if not folder.exists():
        raise NodeError(node, f"{what} folder {str(folder)!r} does not exist")
    return folder


class FewstepSampler:
    """Any fewstep solver as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."""

    DESCRIPTION = ("fewstep's ODE solvers (exact multistep, DPM-Solver++, UniPC, DEIS, iPNDM, gradient estimation, "
                   "AMED-Solver) with their options and the analytical first step (AFS); EPS, V-prediction, EDM and "
                   "flow (CONST) models, every solver in the model's own frame.")
    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "solver": (list(SOLVERS), {"default": "dpmpp", "tooltip": "fewstep solvers: `fewstep solvers`"}),
                "max_order": ("INT", {"default": 0, "min": 0, "max": 4,
                                      "tooltip": "maximal order (0: the solver's default); multistep solvers"}),
                "afs": ("BOOLEAN", {"default": False,
                                    "tooltip": "analytical first step: the first model call is replaced by a "
                                               "closed-form estimate (one call fewer)"}),
            },
            "optional": {
                "options": ("STRING", {"default": "", "tooltip": "more solver options, key=value separated by "
                                       "commas: deis_mode=rhoab, variant=bh1, r=0.4, gamma=2, lower_order_final=false, "
                                       "predict_x0=false, thresholding=true, threshold_ratio=0.995"}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, solver: str | None = None, max_order: int | None = None, afs: bool | None = None,
                        options: str | None = "") -> bool | str:
        return _message(SAMPLER, sampler_options, solver, max_order, afs, options or "")

    def get_sampler(self, solver: str, max_order: int, afs: bool, options: str = "") -> tuple[Any]:
        try:
            opts = sampler_options(solver, max_order, afs, options)
        except FewstepError as e:
            raise NodeError(SAMPLER, e) from None
        return (ksampler(bridge.sampler_function(SAMPLER, solver, opts)),)


def _check_schedule_inputs(schedule: str, rho: float, argument: str) -> None:
    """What the Sigmas node can check without the model."""
    if schedule not in bridge.SCHEDULES:
        raise ScheduleError(f"unknown schedule {schedule!r}; choose one of {', '.join(bridge.SCHEDULES)}")
    argument = (argument or "").strip()
    if schedule == "flow":
        parse_flow_arg(argument)
    elif schedule == "gits" and not Path(argument).expanduser().is_file():
        raise ScheduleError(f"the gits schedule needs its file (`fewstep gits --out FILE`): {argument!r} not found"
                            if argument else "the gits schedule needs its file (`fewstep gits --out FILE`)")
    elif schedule not in ("oss", "ays", "gits") and argument:
        raise ScheduleError(f"schedule {schedule!r} takes no argument, got {argument!r}")
    if rho and schedule not in ("polynomial", "time_uniform"):
        raise ScheduleError(f"schedule {schedule!r} takes no rho (leave it at 0)")


class FewstepSigmas:
    """fewstep's schedules as SIGMAS on the connected model's own σ range (flow times for CONST models)."""

    DESCRIPTION = ("fewstep schedules from the model's own range: polynomial (Karras, rho 7), logsnr, "
                   "time_uniform, discrete, AYS, GITS files; on flow (CONST) models also the flow grid with the "
                   "model's shift (or 'shift=3', 'spacing=karras') and Optimal-Steps tables (oss: flux, wan).")
    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL",),
                "schedule": (list(bridge.SCHEDULES), {"default": "polynomial"}),
                "steps": ("INT", {"default": 8, "min": 1, "max": 1000,
                                  "tooltip": "model calls of a one-call solver (the sigmas end with 0)"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
            "optional": {
                "rho": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                  "tooltip": "polynomial / time_uniform warp (0: 7 / 1)"}),
                "argument": ("STRING", {"default": "", "tooltip": "flow: shift=3, mu=1.15, spacing=karras, "
                                        "terminal=0.1 (default: the model's shift); oss: flux or wan; ays: sd15 "
                                        "or sdxl; gits: the schedule file"}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, schedule: str | None = None, rho: float | None = 0.0,
                        argument: str | None = "") -> bool | str:
        return _message(SIGMAS, _check_schedule_inputs, schedule, rho or 0.0, argument or "")

    def get_sigmas(self, model: Any, schedule: str, steps: int, denoise: float, rho: float = 0.0,
                   argument: str = "") -> tuple[torch.Tensor]:
        sampling = _model_sampling(SIGMAS, model)
        try:
            _check_schedule_inputs(schedule, rho, argument)
            return (bridge.sigmas(sampling, schedule, steps, denoise, rho, argument),)
        except FewstepError as e:
            raise NodeError(SIGMAS, e) from None


def _run_card(card: Any, model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Any, callback: Any,
              disable: Any, flow: bool | None = None) -> torch.Tensor:
    return sample_learned(model, x, sigmas, extra_args, callback, disable, card=card, flow=flow)


def _check_frame(node: str, what: str, frame: Any, model_name: Any, sampling: Any) -> None:
    """Refuse a card or checkpoint of the other model family (flow vs diffusion) than the connected model."""
    if frame is not bridge.frame_of_sampling(sampling):
        raise NodeError(node, f"this {what} on {KINDS[frame.name]} model ({model_name!r}); the connected model is "
                              f"{bridge.describe(sampling)}")


def _check_card(card: str) -> None:
    from ..learned import load_card

    load_card(_folder(CARD, card, "card"))


class FewstepCard:
    """A learned solver card (`fewstep learn`) as SAMPLER + SIGMAS (its own grid, then the final step to 0)."""

    DESCRIPTION = ("A learned solver card folder (made by `fewstep learn` for this model): its solver and its own "
                   "grid. A card learned for another model family (flow vs diffusion), another σ range or another "
                   "latent size is refused.")
    CATEGORY = "sampling/custom_sampling"
    RETURN_TYPES = ("SAMPLER", "SIGMAS")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",),
                             "card": ("STRING", {"default": "", "tooltip": "the card folder (fewstep learn --out)"})}}

    @classmethod
    def VALIDATE_INPUTS(cls, card: str | None = None) -> bool | str:
        return _message(CARD, _check_card, card)

    def load(self, model: Any, card: str) -> tuple[Any, torch.Tensor]:
        from ..learned import load_card

        sampling = _model_sampling(CARD, model)
        try:
            loaded = load_card(_folder(CARD, card, "card"))
        except FewstepError as e:
            raise NodeError(CARD, e) from None
        _check_frame(CARD, "card was learned", loaded.frame, loaded.model.get("name"), sampling)
        solver = loaded.solver()
        bridge.check_grid_range(sampling, solver.grid, CARD)
        function = bridge.sampler_function(CARD, solver, frame=loaded.frame, shape=loaded.model.get("shape"),
                                           run=_run_card)
        return ksampler(function), bridge.with_zero(solver.grid)


def _check_checkpoint(path: str) -> None:
    from ..amed.checkpoint import load_checkpoint

    load_checkpoint(_folder(AMED, path, "AMED checkpoint"))


class FewstepAMED:
    """An AMED predictor checkpoint (`fewstep train`) as SAMPLER + SIGMAS: the AMED-Plugin of its solver."""

    DESCRIPTION = ("An AMED checkpoint folder (made by `fewstep train` for this model): the AMED-Plugin of its "
                   "student solver on its grid, with its AFS. `bottleneck` names the network module whose output "
                   "the predictor was trained on (e.g. diffusion_model.middle_block); empty: the denoised estimate.")
    CATEGORY = "sampling/custom_sampling"
    RETURN_TYPES = ("SAMPLER", "SIGMAS")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",),
                             "checkpoint": ("STRING", {"default": "", "tooltip": "fewstep train --out folder"})},
                "optional": {"bottleneck": ("STRING", {"default": "", "tooltip": "module path in the model, "
                                                       "e.g. diffusion_model.middle_block (empty: none)"})}}

    @classmethod
    def VALIDATE_INPUTS(cls, checkpoint: str | None = None) -> bool | str:
        return _message(AMED, _check_checkpoint, checkpoint)

    def load(self, model: Any, checkpoint: str, bottleneck: str = "") -> tuple[Any, torch.Tensor]:
        from ..amed.checkpoint import load_checkpoint

        sampling = _model_sampling(AMED, model)
        try:
            predictor, settings = load_checkpoint(_folder(AMED, checkpoint, "AMED checkpoint"))
            grid = settings.schedule_tensor()
        except FewstepError as e:
            raise NodeError(AMED, e) from None
        frame = get_frame(settings.frame)
        _check_frame(AMED, "predictor was trained", frame, settings.model, sampling)
        bridge.check_grid_range(sampling, grid, AMED)
        module = None
        if bottleneck.strip():
            try:
                module = model.get_model_object(bottleneck.strip())
            except (AttributeError, KeyError):
                module = None
            if not isinstance(module, torch.nn.Module):
                raise NodeError(AMED, f"the model has no module {bottleneck.strip()!r} (e.g. "
                                      "diffusion_model.middle_block)")
        function = bridge.sampler_function(AMED, settings.solver(predictor, module), {"afs": settings.afs},
                                           frame=frame, shape=settings.model_shape)
        return ksampler(function), bridge.with_zero(grid)


NODE_CLASS_MAPPINGS = {"FewstepSampler": FewstepSampler, "FewstepSigmas": FewstepSigmas,
                       "FewstepCard": FewstepCard, "FewstepAMED": FewstepAMED}
NODE_DISPLAY_NAME_MAPPINGS = {"FewstepSampler": SAMPLER, "FewstepSigmas": SIGMAS, "FewstepCard": CARD,
                              "FewstepAMED": AMED}
