"""diffusers models as fewstep denoisers, and fewstep's solvers as a diffusers scheduler.

`DiffusersDenoiser` wraps a `UNet2DModel` / `UNet2DConditionModel` and the ᾱ table of its training scheduler as
D(x, σ) (SPEC §2, discrete VP models):

* σ_k = √((1 − ᾱ_k)/ᾱ_k); the network sees x_vp = x/√(1 + σ²) and the timestep of σ found by interpolating
  log σ over the table (fractional, the default) or that timestep rounded (`snap_timesteps=True`, diffusers'
  choice for Karras σ's: the σ itself is kept for the input scaling and the conversion below).
* ε-prediction: D = x − σ·ε̂; v-prediction: D = α·x_vp − s·v̂ (α = 1/√(1+σ²), s = σα); `sample`: D = x̂₀.
  A network with 2C output channels (learned variance) is read through its first C channels.
* Classifier-free guidance in one doubled batch [uncond; cond] with ε = ε_u + w(ε_c − ε_u) computed in the
  network's dtype, exactly as diffusers' pipelines do; the network is called in its own dtype while x, σ and
  D stay in the solver's float32/float64.
* `sigma_table`, `sigma_min`, `sigma_max` (the `discrete` schedule works on it) and `bottleneck`: a tap module
  that receives the `mid_block` output of the conditional rows during every call (AMED's features; a forward
  hook on it works like a hook on the mid_block of an unguided model).

`FewstepScheduler` runs any fewstep solver inside an unchanged diffusers pipeline. How it works:

* **All solver maths stays in fewstep.** The scheduler drives fewstep's own `integrate` (plus the final
  `denoise_to_zero` evaluation) with an evaluator that answers from the list of model evaluations received so
  far and *interrupts* the driver at the first evaluation it does not have yet. That interruption is the
  pipeline's next model call: `step()` turns the pipeline's network output into D for that request, stores it,
  and replays the driver from x_T to the next request, whose state it returns as `prev_sample`. Replaying is
  deterministic, so the result is the one `fewstep.sample` computes (the solver work is O(NFE²) cheap
  elementwise steps; the network is called once per timestep). Nothing survives `set_timesteps`, so two
  pipeline calls never share state.
* **Coordinates.** The pipeline's latents are fewstep's VE state x (k-diffusion convention, as diffusers' Euler
  and Heun schedulers): `init_noise_sigma` = σ_0, so the pipeline's x_T = σ_0·z is fewstep's; `scale_model_input`
  returns x_vp = x/√(1 + σ²) of the requested evaluation; the final latents are the state at σ_min, or
  D(x, σ_min) with `final_sigmas_type="zero"` (the default, = `denoise_to_zero`). `step()` ignores edits that
  a pipeline makes to the latents between steps (it warns once): the solver's state lives in the scheduler.
* **Timesteps.** `num_inference_steps` counts intervals as diffusers does (the final step to σ = 0 included):
  N = num_inference_steps grid points with `final_sigmas_type="zero"`, num_inference_steps + 1 otherwise.
  `timesteps` lists one model timestep per network call (NFE entries): multi-evaluation solvers (heun, dpm2,
  AMED-Plugin) get their intermediate points interleaved, and `order` is their evaluations per interval, so the
  pipeline's progress bar counts intervals. Custom `timesteps=` (model timesteps of the grid) and `sigmas=`
  (a trailing 0 means a final step to σ = 0) are accepted.
* **AFS** (analytical first step) works: the first direction is analytic, so the pipeline's first network call
  already happens at the solver's second evaluation point and `timesteps` is one shorter (NFE − 1). Before the
  first `step()` the batch size is unknown (the pipeline may have doubled the latents for guidance), so the
  first model input is computed from the latents handed to `scale_model_input`, split into their identical
  guidance copies (the first step from an analytic node is row-wise, so any split gives the same rows), and
  the run proper starts from the latents `step()` receives.
* **AMED-Plugin** (`predictor=` an `AMEDPredictor` or a checkpoint folder, `unet=pipe.unet`): the predictor reads
  the real `mid_block` output of the call at t_n (a forward hook on `unet.mid_block`, rows of the conditional
  branch when the batch is doubled for guidance, i.e. the same features as `DiffusersDenoiser.bottleneck`). Its
  intermediate times s_n are only known at run time and may differ per sample, so `timesteps` holds placeholders
  (the predictor's choice for zero features), the entry is rewritten in place as soon as s_n is known, and a
  forward pre-hook on the unet substitutes the exact per-sample timesteps while the scheduler is armed (between
  `scale_model_input` and `step`). Hooks exist only during a run.
* Not supported: starting part-way (img2img / inpainting with strength < 1: `set_begin_index(k > 0)` raises),
  stochastic samplers (fewstep's solvers are ODE solvers; `eta`/`generator` are not accepted).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

try:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise ImportError("fewstep.integrations.diffusers needs diffusers: pip install 'fewstep[diffusers]'") from e

from ..amed.features import generic_features, reduce_to_features
from ..errors import ModelError, SolverError
from ..schedules import DEFAULT_RHO, check_schedule, get_schedule, sigma_to_timestep, timestep_to_sigma
from ..solvers import RECOMMENDED_SCHEDULE, Evaluator, Node, _solver_dtype, get_solver, integrate, nfe
from ..solvers.base import bcast

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_DDPM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "rescale_betas_zero_snr")


# ------------------------------------------------------------------------------------------------ σ table


def alphas_cumprod_from_config(config: Any) -> torch.Tensor:
    """ᾱ_k of a DDPM-style scheduler config (any diffusers scheduler config, or a dict), computed by diffusers'
    own `DDPMScheduler` so that every beta schedule (linear, scaled_linear, squaredcos_cap_v2, trained_betas,
    rescale_betas_zero_snr) matches bit for bit."""
    cfg = dict(config)
    kwargs = {k: cfg[k] for k in _DDPM_KEYS if k in cfg and cfg[k] is not None}
    return DDPMScheduler(**kwargs).alphas_cumprod.clone()


def _alphas_cumprod(source: Any) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    if hasattr(source, "alphas_cumprod"):  # a scheduler object
        return torch.as_tensor(source.alphas_cumprod)
    if hasattr(source, "keys"):  # a config
        return alphas_cumprod_from_config(source)
    return torch.as_tensor(source)


class VPTable:
    """The conversions between fewstep's σ-space and a discrete VP network, shared by `DiffusersDenoiser` and
    `FewstepScheduler` so that both compute bit-identical network inputs, timesteps and D."""

    def __init__(self, alphas_cumprod: Any, prediction_type: str = "epsilon", snap_timesteps: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"prediction_type {prediction_type!r} not in {list(PREDICTION_TYPES)}")
        ac = _alphas_cumprod(alphas_cumprod).detach().to("cpu", torch.float64).reshape(-1).clone()
        if ac.numel() < 2 or not torch.isfinite(ac).all() or (ac < 0).any() or (ac >= 1).any():
            raise ModelError("alphas_cumprod must hold at least 2 values in [0, 1)")
        if ac[-1] == 0:  # zero terminal SNR: σ would be infinite; diffusers' Euler scheduler uses 2^-24 too
            ac[-1] = 2.0**-24
        table = ((1 - ac) / ac).sqrt()
        if (table[1:] <= table[:-1]).any():
            raise ModelError("alphas_cumprod must be strictly decreasing (σ table strictly increasing)")
        self.sigma_table = table
        self.prediction_type = prediction_type
        self.snap_timesteps = bool(snap_timesteps)

    @property
    def sigma_min(self) -> float:
        return float(self.sigma_table[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_table[-1])

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model timesteps (float32, on σ's device) of σ: fractional by log-σ interpolation, or rounded."""
        t = sigma_to_timestep(sigma.detach().to("cpu", torch.float64), self.sigma_table)
        if self.snap_timesteps:
            t = t.round()
        return t.to(device=sigma.device, dtype=torch.float32)

    @staticmethod
    def model_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_vp = x/√(1 + σ²), in x's dtype."""
        s = bcast(sigma, x)
        return x / torch.sqrt(1 + s * s)

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """D(x, σ) from the network output (ε, v or x̂₀), in x's dtype."""
        if output.shape[1:] != x.shape[1:] and output.ndim == x.ndim and output.shape[1] == 2 * x.shape[1]:
            output = output[:, : x.shape[1]]  # learned variance: [ε, v_var]
        out = output.to(device=x.device, dtype=x.dtype)
        s = bcast(sigma, x)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            alpha = 1 / torch.sqrt(1 + s * s)
            return alpha * self.model_input(x, sigma) - (s * alpha) * out
        return out


# ------------------------------------------------------------------------------------------------ denoiser


class BottleneckTap(nn.Module):
    """Identity module that `DiffusersDenoiser` calls with the bottleneck features of each model call, so that
    a forward hook on it (fewstep's `feature_source`) sees one row per sample even under guidance."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


def _rows(t: torch.Tensor, b: int, what: str) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise ModelError(f"{what} has batch {t.shape[0]}, expected 1 or {b}")


class DiffusersDenoiser:
    """A diffusers UNet (`UNet2DModel` / `UNet2DConditionModel`) as fewstep's D(x, σ).

    `alphas_cumprod`: the training ᾱ table, or a scheduler / scheduler config to take it from (e.g.
    `pipe.scheduler`). `prediction_type` defaults to that scheduler's. `encoder_hidden_states` (cond) and
    `negative_encoder_hidden_states` (uncond) are text embeddings with batch 1 or B; with the latter and
    `guidance_scale` ≠ 1 the network runs once on the doubled batch [uncond; cond]. `class_labels` and
    `unet_kwargs` are passed to the network (the caller matches them to the doubled batch when guiding).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Any, *, prediction_type: str | None = None,
                 snap_timesteps: bool = False, encoder_hidden_states: torch.Tensor | None = None,
                 negative_encoder_hidden_states: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 class_labels: torch.Tensor | None = None, unet_kwargs: dict[str, Any] | None = None):
        if prediction_type is None:
            cfg = getattr(alphas_cumprod, "config", alphas_cumprod)
            prediction_type = cfg.get("prediction_type", "epsilon") if hasattr(cfg, "get") else "epsilon"
        self.unet = unet
        self.table = VPTable(alphas_cumprod, prediction_type, snap_timesteps)
        if isinstance(unet, UNet2DConditionModel) and encoder_hidden_states is None:
            raise ModelError("a UNet2DConditionModel needs encoder_hidden_states (the prompt embeddings)")
        if negative_encoder_hidden_states is not None and encoder_hidden_states is None:
            raise ModelError("negative_encoder_hidden_states given without encoder_hidden_states")
        self.cond = encoder_hidden_states
        self.uncond = negative_encoder_hidden_states
        self.guidance_scale = float(guidance_scale)
        self.class_labels = class_labels
        self.unet_kwargs = dict(unet_kwargs or {})
        self.mid_block = getattr(unet, "mid_block", None)
        self.bottleneck: BottleneckTap | None = BottleneckTap() if self.mid_block is not None else None

    # what fewstep's samplers, schedules and the CLI read
    @property
    def sigma_table(self) -> torch.Tensor:
        return self.table.sigma_table

    @property
    def sigma_min(self) -> float:
        return self.table.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.table.sigma_max

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, H, W) of one sample, from the network's config."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
        return (int(cfg.in_channels), *map(int, size))

    @property
    def guided(self) -> bool:
        return self.uncond is not None and self.guidance_scale != 1.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma.reshape(-1)
        x_in, t = self.table.model_input(x, sigma), self.table.timesteps(sigma)
        kwargs = dict(self.unet_kwargs)
        if self.cond is not None:
            cond = _rows(self.cond, b, "encoder_hidden_states")
            if self.guided:
                cond = torch.cat([_rows(self.uncond, b, "negative_encoder_hidden_states"), cond])
            kwargs["encoder_hidden_states"] = cond.to(self.dtype)
        if self.guided:
            x_in, t = torch.cat([x_in, x_in]), torch.cat([t, t])
        if self.class_labels is not None:
            kwargs["class_labels"] = self.class_labels
        captured: list[torch.Tensor] = []
        handle = None
        if self.bottleneck is not None:
            handle = self.mid_block.register_forward_hook(
                lambda m, i, o: captured.append(o[0] if isinstance(o, (tuple, list)) else o))
        try:
            device = next(self.unet.parameters()).device
            out = self.unet(x_in.to(device=device, dtype=self.dtype), t.to(device), return_dict=False, **kwargs)[0]
        finally:
            if handle is not None:
                handle.remove()
        if self.guided:
            eps_u, eps_c = out.chunk(2)
            out = eps_u + self.guidance_scale * (eps_c - eps_u)
        if self.bottleneck is not None and captured:
            self.bottleneck(captured[-1][-b:])  # the conditional rows under guidance
        return self.table.denoised(x, sigma, out)


# ------------------------------------------------------------------------------------------------ scheduler


@dataclass
class _Request:
    """A model evaluation the driver asked for: state x at node σ, network called at model σ (rows of x)."""

    x: torch.Tensor
    sigma: torch.Tensor
    model_sigma: torch.Tensor | None
    step: int

    @property
    def s_arg(self) -> torch.Tensor:  # exactly what fewstep's Evaluator hands a denoiser
        s = self.sigma if self.model_sigma is None else self.model_sigma
        return s.to(device=self.x.device, dtype=self.x.dtype).expand(self.x.shape[0])


class _NeedModel(Exception):
    def __init__(self, request: _Request):
        super().__init__("model evaluation needed")
        self.request = request


class _ReplayEvaluator(Evaluator):
    """Answers the driver from the evaluations received so far; interrupts it at the first missing one."""

    def __init__(self, nodes: list[Node]):
        super().__init__(denoiser=None)  # type: ignore[arg-type]
        self.nodes = nodes

    def __call__(self, x, sigma, step, model_sigma=None):
        if self.calls < len(self.nodes):
            node = self.nodes[self.calls]
            self.calls += 1
            return Node(sigma, x, node.denoised, node.features)
        raise _NeedModel(_Request(x, sigma, model_sigma, step))


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Any fewstep solver (and AMED-Plugin) as a diffusers scheduler; see the module docstring for the design.

    `FewstepScheduler.from_config(pipe.scheduler.config, solver="ipndm", solver_options={"max_order": 3})` keeps the
    pipeline's ᾱ table and prediction type. Options: `solver`, `solver_options` (the solver's own, see
    `fewstep solvers`), `schedule` (a fewstep schedule name; default the solver's recommended one) and `rho`,
    `sigma_min`/`sigma_max` (default: the model's table range), `afs`, `final_sigmas_type` ("zero": a final
    D(x, σ_min), or "sigma_min"), `snap_timesteps` (round the network's timesteps), `thresholding` with
    `dynamic_thresholding_ratio`. Runtime-only (not saved in the config): `predictor` (an `AMEDPredictor`, or an
    AMED checkpoint folder whose stored solver, options, schedule, σ range and AFS then apply) and `unet`
    (required with a predictor: the pipeline's unet).
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
    ):
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise SolverError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        self.alphas_cumprod = alphas_cumprod_from_config(self.config)
        self._table = VPTable(self.alphas_cumprod, prediction_type, snap_timesteps)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self.sigmas: torch.Tensor | None = None
        self._grid: torch.Tensor | None = None
        self._hooks: list[Any] = []
        self._checkpoint_steps: int | None = None
        self.attach(predictor, unet)

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' `from_config`, also accepting the runtime-only `predictor=` and `unet=`."""
        runtime = {k: kwargs.pop(k) for k in cls.ignore_for_config if k in kwargs}
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
        self._solver_options = dict(self.config.solver_options or {})
        self._algo = get_solver(self.config.solver, **self._solver_options)
        nfe(self.config.solver, 2, amed=self.predictor is not None, **self._solver_options)  # e.g. heun has no AMED
        self.order = self._order()
        self._grid = None
        self._reset()
        return self

    def _order(self) -> int:
        return 2 if (self.predictor is not None or self._algo.evals_per_step == 2) else 1

    @property
    def sigma_table(self) -> torch.Tensor:
        return self._table.sigma_table

    @property
    def grid(self) -> torch.Tensor | None:
        """fewstep's σ grid of the current run (float64, positive points: `sigmas` without its final 0)."""
        return self._grid

    @property
    def init_noise_sigma(self) -> float:
        """σ_0: the pipeline's initial latents σ_0·z are fewstep's x_T."""
        return float(self._grid[0]) if self._grid is not None else (self.config.sigma_max or self._table.sigma_max)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int:
        return 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise NotImplementedError("FewstepScheduler runs the whole ODE from pure noise; starting part-way "
                                      "(img2img / inpainting with strength < 1) is not supported")

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _reset(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._nodes: list[Node] = []
        self._x_T: torch.Tensor | None = None
        self._pending: _Request | None = None
        self._done = False
        self._step_index: int | None = None if self._grid is None else 0
        self._armed: torch.Tensor | None = None  # per-row model timesteps while the network call is pending
        self._captured: torch.Tensor | None = None
        self._returned: torch.Tensor | None = None
        self._warned = False

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | torch.Tensor | None = None,
                      sigmas: list[float] | torch.Tensor | None = None) -> None:
        """Build the σ grid and the list of model timesteps (one per network call), and forget any earlier run.

        `num_inference_steps` counts intervals, the final step to σ = 0 included when `final_sigmas_type` is
        "zero"; or give custom `timesteps` (the grid in model timesteps) or `sigmas` (a trailing 0 asks for the
        final step to σ = 0).
        """
        cfg = self.config
        dtz = cfg.final_sigmas_type == "zero"
        given = sum(v is not None for v in (num_inference_steps, timesteps, sigmas))
        if given != 1:
            raise SolverError("give exactly one of num_inference_steps, timesteps or sigmas")
        if sigmas is not None:
            s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
            dtz = bool(s.numel() > 0 and s[-1] == 0)
            grid = check_schedule(s[:-1] if dtz else s, "sigmas")
        elif timesteps is not None:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().reshape(-1)
            grid = check_schedule(timestep_to_sigma(ts, self._table.sigma_table), "timesteps (as sigmas)")
        else:
            n = int(num_inference_steps)
            points = n if dtz else n + 1
            if points < 2:
                raise SolverError(f"num_inference_steps={n} gives {points} grid point(s); fewstep needs >= 2 "
                                  f"(use >= {2 if dtz else 1} steps)")
            name, rho = cfg.schedule, cfg.rho
            if name is None:
                name, rec_rho = RECOMMENDED_SCHEDULE.get(cfg.solver, ("polynomial", 7.0))
                rho = rec_rho if rho is None else rho
            if name not in DEFAULT_RHO:
                rho = None  # e.g. an EDM scheduler config's rho, meaningless for logsnr / discrete
            lo = cfg.sigma_min if cfg.sigma_min is not None else self._table.sigma_min
            hi = cfg.sigma_max if cfg.sigma_max is not None else self._table.sigma_max
            grid = get_schedule(name, points, lo, hi, rho=rho, model=self._table)
        ckpt_steps = self._checkpoint_steps
        if ckpt_steps is not None and ckpt_steps != len(grid):
            warnings.warn(f"the AMED predictor was trained for {ckpt_steps} grid points; this run uses {len(grid)}",
                          stacklevel=2)
        self._grid, self._dtz = grid, dtz
        self._reset()
        self._step_index = 0
        # the model σ of every evaluation (data-independent, except AMED's learned s_n: placeholders)
        asked: list[torch.Tensor] = []

        def record(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            asked.append(s[:1])
            return torch.zeros_like(x)

        self._drive(torch.zeros(1, 1), Evaluator(record))
        expected = nfe(cfg.solver, len(grid), afs=cfg.afs, denoise_to_zero=dtz, amed=self.predictor is not None,
                       **self._solver_options)
        assert len(asked) == expected, f"internal: {len(asked)} evaluations, nfe() says {expected}"
        ts = self._table.timesteps(torch.cat(asked))
        if cfg.snap_timesteps:
            ts = ts.long()
        self.timesteps = ts.to(device)
        self.sigmas = torch.cat([grid, grid.new_zeros(int(dtz))]).to(device=device, dtype=torch.float32)
        self.num_inference_steps = len(grid) - 1 + int(dtz)
        self.order = self._order()
        if self.predictor is not None:
            self._install_hooks()

    def _install_hooks(self) -> None:
        unet = self.unet

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            if self._armed is None:
                return None
            rows = (args[0] if args else kwargs["sample"]).shape[0]
            if rows % self._armed.shape[0]:
                raise SolverError(f"unet called with batch {rows}, not a multiple of the scheduler's "
                                  f"{self._armed.shape[0]} rows")
            t = self._armed.repeat(rows // self._armed.shape[0])
            if len(args) >= 2:
                return (args[0], t, *args[2:]), kwargs
            return args, {**kwargs, "timestep": t}

        self._hooks.append(unet.register_forward_pre_hook(pre, with_kwargs=True))
        mid = getattr(unet, "mid_block", None)
        if mid is not None:
            def capture(module: nn.Module, inputs: Any, output: Any) -> None:
                if self._armed is not None:
                    self._captured = output[0] if isinstance(output, (tuple, list)) else output

            self._hooks.append(mid.register_forward_hook(capture))

    # -------------------------------------------------------------------------------------------- driving

    def _drive(self, x: torch.Tensor, ev: Evaluator) -> torch.Tensor:
        """fewstep.sample's driver on the grid from the state x at σ_0 (predictor, AFS, denoise_to_zero)."""
        controller = self.predictor.control if self.predictor is not None else None
        with torch.no_grad():
            x = integrate(self._algo, ev, x, self._grid, afs=self.config.afs, controller=controller)
            if self._dtz:
                ev.features = None
                x = ev(x, self._grid[-1:], len(self._grid) - 1).denoised
        return x

    def _next(self, x_T: torch.Tensor) -> _Request | torch.Tensor:
        """Replay the run with the evaluations received so far: the next request, or the final result."""
        try:
            return self._drive(x_T, _ReplayEvaluator(self._nodes))
        except _NeedModel as need:
            return need.request

    def _check_ready(self) -> None:
        if self._grid is None:
            raise SolverError("call set_timesteps() before scale_model_input() / step()")
        if self._done:
            raise SolverError(f"the run is complete after {len(self._nodes)} model evaluations; call set_timesteps() "
                              "to start a new one")

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network input x_vp = x/√(1+σ²) of the pending evaluation, repeated to `sample`'s rows (guidance)."""
        self._check_ready()
        if self._pending is None:  # before the first step(): the batch size is not known yet
            x_T = sample.detach().to(_solver_dtype(sample))
            rows = x_T.shape[0]  # guess the guidance copies (exactness only: the first step is row-wise anyway)
            b = next((c for c in range(1, rows) if rows % c == 0
                      and torch.equal(x_T, torch.cat([x_T[:c]] * (rows // c)))), rows)
            req = self._next(x_T[:b])
            rows_x, rows_s = torch.cat([req.x] * (rows // b)), torch.cat([req.s_arg] * (rows // b))
        else:
            req = self._pending
            b = req.x.shape[0]
            if sample.shape[0] % b or sample.shape[1:] != req.x.shape[1:]:
                raise SolverError(f"scale_model_input got shape {tuple(sample.shape)}, expected rows of "
                                  f"{tuple(req.x.shape)} (the scheduler's state)")
            k = sample.shape[0] // b
            rows_x, rows_s = torch.cat([req.x] * k), torch.cat([req.s_arg] * k)
        self._captured = None
        self._armed = self._table.timesteps(rows_s)
        return self._table.model_input(rows_x, rows_s).to(sample.dtype)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True,
             **kwargs: Any) -> SchedulerOutput | tuple[torch.Tensor]:
        """Take the network output for the pending evaluation; return the state of the next one (or the result)."""
        self._check_ready()
        if self._x_T is None:
            self._x_T = sample.detach().to(_solver_dtype(sample)).clone()
            self._pending = self._next(self._x_T)
        elif self._returned is not None and not self._warned and not torch.equal(sample, self._returned):
            warnings.warn("the latents were changed between scheduler steps; FewstepScheduler keeps the solver "
                          "state itself and ignores such edits", stacklevel=2)
            self._warned = True
        req = self._pending
        b = req.x.shape[0]
        if model_output.shape[0] != b:
            raise SolverError(f"step() got a model output of batch {model_output.shape[0]} for a state of batch {b} "
                              "(combine the guidance branches before step(), as diffusers' pipelines do)")
        features = None
        if self.predictor is not None:
            captured = self._captured
            if self.unet is not None and getattr(self.unet, "mid_block", None) is not None:
                if captured is None or captured.shape[0] % b:
                    raise SolverError("the unet's mid_block produced no output of the expected batch during this step")
                features = lambda x, d: reduce_to_features(captured[-b:])
            else:
                features = generic_features
        out = model_output
        ev = Evaluator(lambda x, s: self._table.denoised(x, s, out),
                       self.config.dynamic_thresholding_ratio if self.config.thresholding else None, features)
        node = ev(req.x, req.sigma, req.step, model_sigma=req.model_sigma)
        self._nodes.append(node)
        self._armed, self._captured = None, None
        self._step_index += 1
        nxt = self._next(self._x_T)
        if isinstance(nxt, _Request):
            self._pending = nxt
            if self.predictor is not None and self._step_index < len(self.timesteps):  # the learned time, in place
                t = self._table.timesteps(nxt.s_arg).mean()
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

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """VE noising x = x₀ + σ(t)·n (the scheduler's latent convention)."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().reshape(-1)
        s = timestep_to_sigma(t, self._table.sigma_table).to(original_samples.device, original_samples.dtype)
        return original_samples + bcast(s, original_samples) * noise


__all__ = ["BottleneckTap", "DiffusersDenoiser", "FewstepScheduler", "VPTable", "alphas_cumprod_from_config"]
