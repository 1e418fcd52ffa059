"""`FewstepScheduler`: any fewstep solver (and AMED-Plugin) as a diffusers scheduler, a thin consumer of fewstep's
driver; the design is described in `fewstep.integrations.diffusers`, which re-exports it.

The driver state of a run (the pending request, the edits, the served inputs) lives here, in `set_timesteps`,
`scale_model_input` and `step`. Around it: `diffusers_timetable.py` (the grid, the model timestep of each call,
img2img's begin index and noising: a function of the config, no run state), `diffusers_hooks.py` (the network
hooks of AMED and of flow pipelines), `vp_table.py` (σ-space ↔ VP conversions shared with `DiffusersDenoiser`)
and `diffusers_flow.py` (flow mode: FlowMatch* configs, UniPC / DPM with `use_flow_sigmas`: shift settings,
grids, x_t ↔ velocity).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise ImportError("fewstep.integrations.diffusers needs diffusers: pip install 'fewstep[diffusers]'") from e

from ..amed.features import reduce_to_features
from ..amed.solver import AMEDPlugin
from ..errors import SolverError
from ..frames import EDM, FLOW, frame_of
from ..methods import SolverSpec, load_solver_spec
from ..solvers import Evaluator, GridPoint, ModelRequest, Node, run, solver_dtype
from .diffusers_flow import FlowSettings, FlowTable, adapt_config, finite, is_flow
from .diffusers_hooks import NetworkHooks
from .diffusers_timetable import Timetable, _model_sigmas
from .vp_table import VPTable, _ddpm_from_config


def _next_request(steps: Any, reply: Node | None) -> ModelRequest | torch.Tensor:
    """Send `reply` to the driver and return its next model request, or its result when the run ends."""
    try:
        msg = steps.send(reply)
        while isinstance(msg, GridPoint):
            msg = steps.send(None)
        return msg
    except StopIteration as stop:
        return stop.value


class FewstepScheduler(Timetable, NetworkHooks, SchedulerMixin, ConfigMixin):
    """Any fewstep solver (and AMED-Plugin) as a diffusers scheduler; see the module docstring for the design.

    `FewstepScheduler.from_config(pipe.scheduler.config, solver="ipndm", solver_options={"max_order": 3})` keeps the
    pipeline's ᾱ table and prediction type, or on a flow config (FlowMatch*, or `use_flow_sigmas=True` with
    `prediction_type="flow_prediction"`) its shift settings: it then integrates in the flow frame (`diffusers_flow`).
    Options: `solver`, `solver_options` (the solver's own, see
    `fewstep solvers`), `schedule` (a fewstep schedule name; default the solver's recommended one) and `rho`,
    `sigma_min`/`sigma_max` (default: the model's table range), `afs`, `final_sigmas_type` ("zero": a final
    D(x, σ_min), or "sigma_min"), `snap_timesteps` (round the network's timesteps), `thresholding` with
    `dynamic_thresholding_ratio`. Runtime-only (not saved in the config): `predictor` (an `AMEDPredictor`, or an
    AMED checkpoint folder whose stored solver, options, schedule, σ range and AFS then apply) and `unet`
    (required with a predictor: the pipeline's unet; in flow mode the pipeline's transformer, needed with AFS,
    whose first network input is not the pipeline's latents). Flow configs (`prediction_type="flow_prediction"`)
    read diffusers' keys `shift` (`flow_shift` with `use_flow_sigmas`), `use_dynamic_shifting`, `base_shift`,
    `max_shift`, `base_image_seq_len`, `max_image_seq_len`, `time_shift_type`, `shift_terminal` and
    `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas`; VP configs ignore them.
    """

    ignore_for_config: ClassVar[list[str]] = ["predictor", "unet"]
    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]  # configs with an ᾱ table
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        solver: str = "dpmpp",
        solver_options: dict[str, Any] | None = None,
        schedule: str | None = None,
        rho: float | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        afs: bool = False,
        final_sigmas_type: str = "zero",
        snap_timesteps: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        predictor: Any = None,
        unet: nn.Module | None = None,
        shift: float = 1.0,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
    ):
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise SolverError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        self._flow = FlowSettings.of(self.config) if is_flow(self.config) else None
        self._frame = EDM if self._flow is None else FLOW
        if self._flow is None:
            ddpm = _ddpm_from_config(self.config)
            self.betas, self.alphas_cumprod = ddpm.betas.clone(), ddpm.alphas_cumprod.clone()
            self._table: VPTable | FlowTable = VPTable(self.alphas_cumprod, prediction_type, snap_timesteps)
        else:  # flow mode (the β keys of the config are unused)
            self.betas = self.alphas_cumprod = None
            self._table = FlowTable(self._flow)
        self._begin = self._begin_call = 0  # the grid point / model call a flow run starts from (img2img)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self.sigmas: torch.Tensor | None = None
        self._grid: torch.Tensor | None = None
        self._hooks: list[Any] = []
        self._checkpoint_steps: int | None = None
        self.attach(predictor, unet)

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' `from_config`, also accepting the runtime-only `predictor=` and `unet=`; a FlowMatch* config
        gives a flow scheduler (`diffusers_flow.adapt_config`)."""
        runtime = {k: kwargs.pop(k) for k in cls.ignore_for_config if k in kwargs}
        kwargs = adapt_config(config, kwargs)
        out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = out[0] if isinstance(out, tuple) else out
        if runtime:
            scheduler.attach(**runtime)
        return out

    # -------------------------------------------------------------------------------------------- setup

    def attach(self, predictor: Any = None, unet: nn.Module | None = None) -> FewstepScheduler:
        """Set (or clear) the AMED predictor and the pipeline's unet; validates the solver configuration."""
        self.predictor = None
        if predictor is not None:
            if isinstance(predictor, (str, Path)):
                from ..amed.checkpoint import load_checkpoint

                predictor, st = load_checkpoint(predictor)
                self.register_to_config(solver=st.student, solver_options=dict(st.student_options),
                                        schedule=st.schedule, rho=st.rho, sigma_min=st.sigma_min,
                                        sigma_max=st.sigma_max, afs=st.afs)
                self._checkpoint_steps = st.num_steps
            if not callable(getattr(predictor, "control", None)):
                raise SolverError("predictor must be an AMEDPredictor or an AMED checkpoint folder, got "
                                  f"{type(predictor).__name__}")
            if unet is None:
                raise SolverError("AMED-Plugin inside a pipeline needs unet=pipe.unet: its mid_block output feeds "
                                  "the predictor, and the learned per-sample times are passed to it")
            self.predictor = predictor
        self.unet = unet
        loaded = load_solver_spec(self._spec())
        self._card, self._algo = loaded.card, loaded.solver
        if self._card is not None:  # a learned solver card: its own grid and AFS
            if frame_of(self._card) is not self._frame:
                kinds = {"edm": "an EDM / diffusion", "flow": "a flow-matching"}
                raise SolverError(f"this card was learned on {kinds[frame_of(self._card).name]} model; this "
                                  f"scheduler's config is {kinds[self._frame.name]} one "
                                  f"(prediction_type={self.config.prediction_type!r})")
            if self.predictor is not None:
                raise SolverError("a learned solver card takes no AMED predictor")
            self.register_to_config(afs=self._card.afs)
        elif self.predictor is not None:
            self._algo = AMEDPlugin(self._algo, self.predictor)
        self.order = self._algo.evals_per_step
        self._grid = None
        self._timestep_plans = {}
        self._reset()
        return self

    def _spec(self) -> SolverSpec:
        """The configured method: `solver` is a name, 'name:opt=val,...' or 'learned:DIR' (fewstep.methods);
        the schedule and AFS have their own config keys."""
        text, options = self.config.solver, dict(self.config.solver_options or {})
        spec = SolverSpec.parse(text)
        if spec.path:
            return spec
        if "@" in text or spec.afs:
            raise SolverError(f"solver={text!r}: give the schedule and AFS as schedule=, rho=, afs=")
        if options and spec.options:
            raise SolverError(f"solver={text!r} has options; solver_options={options} adds more: give them once")
        return dataclasses.replace(spec, options={**spec.options, **options})

    @property
    def sigma_table(self) -> torch.Tensor:
        return self._table.sigma_table

    @property
    def grid(self) -> torch.Tensor | None:
        """fewstep's σ grid of the current run (float64, positive points: `sigmas` without its final 0; flow times
        in flow mode)."""
        return self._grid

    @property
    def frame(self) -> Any:
        """The frame the run integrates in: `fewstep.frames.EDM` (VP configs) or `FLOW` (flow configs)."""
        return self._frame

    @property
    def init_noise_sigma(self) -> float:
        """σ_0: the pipeline's initial latents σ_0·z are fewstep's x_T (1 in flow mode: x_1 = ε)."""
        if self._flow is not None:
            return 1.0
        return float(self._grid[0]) if self._grid is not None else (self.config.sigma_max or self._table.sigma_max)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int:
        """The model call the run starts at (0 unless img2img on a flow model: `set_begin_index`)."""
        return self._begin_call

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _reset(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._steps: Any = None  # the driver's generator of the current run
        self._evaluations = 0
        self._pending: ModelRequest | None = None
        self._done = False
        self._step_index: int | None = None if self._grid is None else 0
        self._armed: torch.Tensor | None = None  # per-row model timesteps while the network call is pending
        self._captured: torch.Tensor | None = None
        self._returned: torch.Tensor | None = None
        self._warned = False
        self._served = False  # scale_model_input (or the flow input hook) gave the network the pending state

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | torch.Tensor | None = None, mu: float | None = None,
                      timesteps: list[float] | torch.Tensor | None = None) -> None:
        """Build the grid and the list of model timesteps (one per network call), and forget any earlier run.

        `num_inference_steps` counts intervals, the final step to σ = 0 included when `final_sigmas_type` is
        "zero" (fewstep's own `num_steps` counts grid points: num_inference_steps = num_steps − 1, plus 1 for that
        final step; docs/maths.md §1); or give custom `timesteps` (the grid in model timesteps) or `sigmas` (a trailing 0 asks for the
        final step to σ = 0). Flow mode: `sigmas` are unshifted flow times (Flux: linspace(1, 1/N, N)), shifted
        once (by `mu` with `use_dynamic_shifting`); the run always ends with the step to t = 0 unless
        `final_sigmas_type="sigma_min"` (see `diffusers_flow`).
        """
        if self._flow is not None:
            grid, dtz = self._flow_grid(num_inference_steps, sigmas, finite(mu, "mu"), timesteps)
        else:
            grid, dtz = self._vp_grid(num_inference_steps, sigmas, timesteps)
        ckpt_steps = self._checkpoint_steps
        if ckpt_steps is not None and ckpt_steps != len(grid):
            warnings.warn(f"the AMED predictor was trained for {ckpt_steps} grid points; this run uses {len(grid)}",
                          stacklevel=2)
        self._grid, self._dtz, self._begin, self._begin_call = grid, dtz, 0, 0
        self._reset()
        self._step_index = 0
        ts = self._model_timesteps()
        if self.config.snap_timesteps:
            ts = ts.long()
        self.timesteps = ts.to(device)
        self.sigmas = torch.cat([grid, grid.new_zeros(int(dtz))]).to(device=device, dtype=torch.float32)
        self.num_inference_steps = len(grid) - 1 + int(dtz)
        self.order = self._algo.evals_per_step
        self._arm_hooks()

    # -------------------------------------------------------------------------------------------- driving

    def _start(self, x_T: torch.Tensor) -> Any:
        """fewstep.sample's driver on the grid from the state x_T at σ_0 (AFS, denoise_to_zero; a flow run
        started part-way by img2img from its begin point, without AFS)."""
        begin = self._begin
        return run(self._algo, x_T, self._grid[begin:], afs=self.config.afs and begin == 0,
                   denoise_to_zero=self._dtz, frame=self._frame)

    def _check_ready(self) -> None:
        if self._grid is None:
            raise SolverError("call set_timesteps() before scale_model_input() / step()")
        if self._done:
            raise SolverError(f"the run is complete after {self._evaluations} model evaluations; call "
                              "set_timesteps() to start a new one")

    def _edited(self, latents: torch.Tensor) -> bool:
        """Whether the pipeline changed the latents that the last `step()` returned."""
        returned = self._returned
        return returned is not None and latents is not returned and not torch.equal(latents, returned)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network input x_vp = x/√(1+σ²) of the pending evaluation, repeated to `sample`'s rows (guidance).
        Before `set_timesteps` the sample is returned unchanged, as by diffusers' schedulers."""
        if self._grid is None:
            return sample
        self._check_ready()
        if self._pending is None:  # before the first step(): the batch size is not known yet
            x_T = sample.detach().to(solver_dtype(sample))
            rows = x_T.shape[0]  # guess the guidance copies (exactness only: the first step is row-wise anyway)
            b = next((c for c in range(1, rows) if rows % c == 0
                      and torch.equal(x_T, torch.cat([x_T[:c]] * (rows // c)))), rows)
            with torch.no_grad():
                req = _next_request(self._start(x_T[:b]), None)
            x = req.x
        else:
            req = self._pending
            b = req.x.shape[0]
            if sample.shape[0] % b or sample.shape[1:] != req.x.shape[1:]:
                raise SolverError(f"scale_model_input got shape {tuple(sample.shape)}, expected rows of "
                                  f"{tuple(req.x.shape)} (the scheduler's state)")
            latents = sample[:b] if sample.shape[0] > b else sample
            x = latents.to(req.x.dtype) if req.grid_point and self._edited(latents) else req.x
        k = sample.shape[0] // b
        rows_x, rows_s = (torch.cat([x] * k), torch.cat([_model_sigmas(req)] * k)) if k > 1 else (x, _model_sigmas(req))
        self._captured = None
        if self.predictor is not None:  # the pre-hook hands the network these exact per-row timesteps
            self._armed = self._table.timesteps(rows_s)
        self._served = True
        return self._table.model_input(rows_x, rows_s).to(sample.dtype)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True,
             **kwargs: Any) -> SchedulerOutput | tuple[torch.Tensor]:
        """Answer the pending evaluation with the network output; return the state of the next one (or the
        result). Latents edited since the last call are the state the run continues from (see the module doc)."""
        self._check_ready()
        if self._steps is None:
            self._steps = self._start(sample.detach().to(solver_dtype(sample)).clone())
            with torch.no_grad():
                self._pending = _next_request(self._steps, None)
        req = self._pending
        x = req.x
        if self._flow is not None and not self._served and self._evaluations == 0 and req.x.shape == sample.shape \
                and not torch.equal(req.x.to(sample.dtype), sample):
            raise SolverError("the solver's first model call is not at the pipeline's latents (AFS: its first node "
                              "is analytic), and flow pipelines feed their latents to the network directly: pass "
                              "unet=pipe.transformer to FewstepScheduler so that it hands the network that state")
        if self._edited(sample):
            if req.grid_point:
                x = sample.detach().to(req.x.dtype)
            elif not self._warned:
                warnings.warn("latents edited before an intermediate evaluation (a multi-stage step or AMED's "
                              "inserted point) are ignored: that state is not a point of the trajectory",
                              stacklevel=2)
                self._warned = True
        b = x.shape[0]
        if model_output.shape[0] != b:
            raise SolverError(f"step() got a model output of batch {model_output.shape[0]} for a state of batch {b} "
                              "(combine the guidance branches before step(), as diffusers' pipelines do)")
        features = None  # without a mid_block the plugin reads the denoised estimate
        if self.predictor is not None and getattr(self.unet, "mid_block", None) is not None:
            captured = self._captured
            if captured is None or captured.shape[0] % b:
                raise SolverError("the unet's mid_block produced no output of the expected batch during this step")
            features = lambda x, d: reduce_to_features(captured[-b:])
        out = model_output
        ev = Evaluator(lambda x, s: self._table.denoised(x, s, out),
                       self.config.dynamic_thresholding_ratio if self.config.thresholding else None, features)
        with torch.no_grad():
            node = ev(x, req.sigma, req.index, model_sigma=req.model_sigma)
            nxt = _next_request(self._steps, node)
        self._evaluations += 1
        self._armed, self._captured, self._served = None, None, False
        self._step_index += 1
        if isinstance(nxt, ModelRequest):
            self._pending = nxt
            if self.predictor is not None and self._step_index < len(self.timesteps):  # the learned time, in place
                t = self._table.timesteps(_model_sigmas(nxt)).mean()
                self.timesteps[self._step_index] = t.round() if not self.timesteps.is_floating_point() else t
            prev = nxt.x
        else:
            self._pending, self._done = None, True
            for h in self._hooks:
                h.remove()
            self._hooks = []
            prev = nxt
        prev_sample = prev.to(sample.dtype)
        self._returned = prev_sample
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

__all__ = ["FewstepScheduler"]
