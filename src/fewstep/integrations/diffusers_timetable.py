"""The timetable of a `FewstepScheduler` run (a mixin of `diffusers_scheduler`): the grid of `set_timesteps` (VP σ
grids; a flow config's shifted flow-time grids), the model timestep of every network call (a dry run of the
driver), where an img2img run starts (`set_begin_index`), and the forward noising of img2img (`add_noise`,
`scale_noise`). It reads the scheduler's config, solver, card and grid; it keeps no run state of its own.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SolverError
from ..schedules import DEFAULT_RHO, check_schedule, get_schedule, timestep_to_sigma
from ..solvers import ModelRequest, answer, nfe
from ..solvers.base import bcast
from .diffusers_flow import noised


def _model_sigmas(req: ModelRequest) -> torch.Tensor:
    """The per-row σ a denoiser receives for this request (exactly what fewstep's Evaluator hands it)."""
    return req.model_sigma.to(device=req.x.device, dtype=req.x.dtype).expand(req.x.shape[0])


class Timetable:
    """Grid, model timesteps, begin index and noising of `FewstepScheduler` (see the module docstring)."""

    config: Any
    _algo: Any
    _card: Any
    _flow: Any
    _table: Any
    _grid: torch.Tensor | None
    _dtz: bool
    _begin: int
    _begin_call: int
    _step_index: int | None
    _calls: list[tuple[bool, int]]  # (grid point?, index) of every model call of the run
    _call_times: torch.Tensor  # the flow time / σ of every model call (float64)
    _timestep_plans: dict[tuple, tuple[torch.Tensor, list[tuple[bool, int]], torch.Tensor]]
    predictor: Any
    timesteps: torch.Tensor

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at the model call `begin_index` of `timesteps` (img2img with strength < 1: flow mode
        only, at a grid-point call; the run then starts from that grid point, without AFS)."""
        if begin_index == 0:
            if self._begin:
                self._begin = self._begin_call = 0
                self._reset()
                self._step_index = 0
                self._arm_hooks()
            return
        if self._flow is None:
            raise NotImplementedError("FewstepScheduler runs the whole ODE from pure noise; starting part-way "
                                      "(img2img / inpainting with strength < 1) is supported for flow models only")
        if self._grid is None:
            raise SolverError("call set_timesteps() before set_begin_index()")
        calls = self._calls
        k = int(begin_index)
        if not (0 < k < len(calls)) or not calls[k][0] or calls[k][1] >= len(self._grid) - 1:
            valid = [i for i, (grid_point, j) in enumerate(calls) if grid_point and 0 < i and j < len(self._grid) - 1]
            raise SolverError(f"begin_index={k}: a run can start part-way only at the model call of a grid point "
                              f"(one of {valid})")
        if self._card is not None or self.predictor is not None:
            raise SolverError("a learned card or an AMED predictor runs its whole grid; it cannot start part-way")
        self._begin, self._begin_call = calls[k][1], k
        self._reset()
        self._step_index = k
        self._arm_hooks()

    def _vp_grid(self, n: int | None, sigmas: Any, timesteps: Any) -> tuple[torch.Tensor, bool]:
        """The σ grid of a VP run and whether it ends with the step to σ = 0 (see `set_timesteps`)."""
        cfg = self.config
        dtz = cfg.final_sigmas_type == "zero"
        if sum(v is not None for v in (n, timesteps, sigmas)) != 1:
            raise SolverError("give exactly one of num_inference_steps, timesteps or sigmas")
        if sigmas is not None:
            s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
            dtz = bool(s.numel() > 0 and s[-1] == 0)
            return check_schedule(s[:-1] if dtz else s, "sigmas"), dtz
        if timesteps is not None:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().reshape(-1)
            return check_schedule(timestep_to_sigma(ts, self._table.sigma_table), "timesteps (as sigmas)"), dtz
        if self._card is not None:
            return self._card_grid(int(n)), dtz
        points = self._points(int(n))
        name, rho = cfg.schedule, cfg.rho
        if name is None:
            name, rec_rho = self._algo.recommended_schedule
            rho = rec_rho if rho is None else rho
        if name not in DEFAULT_RHO:
            rho = None  # e.g. an EDM scheduler config's rho, meaningless for logsnr / discrete
        lo = cfg.sigma_min if cfg.sigma_min is not None else self._table.sigma_min
        hi = cfg.sigma_max if cfg.sigma_max is not None else self._table.sigma_max
        return get_schedule(name, points, lo, hi, rho=rho, model=self._table), dtz

    def _flow_grid(self, n: int | None, sigmas: Any, mu: float | None, timesteps: Any) -> tuple[torch.Tensor, bool]:
        """The flow-time grid of a flow run: the pipeline's `sigmas` shifted once, `timesteps` / T as given, a
        card's own grid, the configured `schedule`, or fewstep's flow grid of the config's shift."""
        cfg, st = self.config, self._flow
        dtz = cfg.final_sigmas_type == "zero"
        if sigmas is not None and timesteps is not None:
            raise SolverError("give sigmas or timesteps, not both")
        given = None
        if sigmas is not None:
            given = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
            if given.numel() > 1 and given[-1] == 0:
                given = given[:-1]  # the final step to t = 0 is the run's own
        elif timesteps is not None:
            given = self._table.times(torch.as_tensor(timesteps))
        if given is not None:
            if n is not None and int(n) != len(given):
                raise SolverError(f"num_inference_steps={n} but {len(given)} sigmas / timesteps were given")
            n = len(given)
        if n is None:
            raise SolverError("give num_inference_steps, sigmas or timesteps")
        if self._card is not None:  # Flux-style pipelines always pass sigmas: they only fix the step count
            return self._card_grid(int(n)), dtz
        if sigmas is not None:
            return check_schedule(st.shifted(given, mu), "sigmas"), dtz
        if timesteps is not None:
            return check_schedule(given, "timesteps (as flow times)"), dtz
        points = self._points(int(n))
        if cfg.schedule is not None:
            lo = cfg.sigma_min if cfg.sigma_min is not None else st.t_min(mu)
            hi = cfg.sigma_max if cfg.sigma_max is not None else 1.0
            rho = cfg.rho if cfg.schedule.partition(":")[0] in DEFAULT_RHO else None
            return check_schedule(get_schedule(cfg.schedule, points, lo, hi, rho=rho, model=self._table)), dtz
        return check_schedule(st.default_grid(points, mu), "flow grid"), dtz

    def _points(self, n: int) -> int:
        """Grid points of `n` pipeline steps (the final step to 0 is one of them with final_sigmas_type="zero")."""
        dtz = self.config.final_sigmas_type == "zero"
        points = n if dtz else n + 1
        if points < 2:
            raise SolverError(f"num_inference_steps={n} gives {points} grid point(s); fewstep needs >= 2 "
                              f"(use >= {2 if dtz else 1} steps)")
        return points

    def _card_grid(self, n: int) -> torch.Tensor:
        """A learned card's own grid, after checking the pipeline's step count against it."""
        dtz = self.config.final_sigmas_type == "zero"
        if (n if dtz else n + 1) != self._card.num_steps:
            raise SolverError(f"this card runs {self._card.num_steps - 1} intervals: use num_inference_steps="
                              f"{self._card.num_steps - 1 + int(dtz)} "
                              f"(final_sigmas_type={self.config.final_sigmas_type!r})")
        return self._algo.grid

    def _model_timesteps(self) -> torch.Tensor:
        """The model timestep of every evaluation of a run on the current grid, from a dry run of the driver
        (data-independent, except AMED's learned s_n: placeholders); cached per grid without a predictor."""
        key = (tuple(self._grid.tolist()), self._dtz)
        if self.predictor is None and key in self._timestep_plans:
            ts, self._calls, self._call_times = self._timestep_plans[key]
            return ts.clone()
        asked: list[torch.Tensor] = []
        calls: list[tuple[bool, int]] = []
        times: list[float] = []

        def record(req: ModelRequest) -> torch.Tensor:
            asked.append(_model_sigmas(req)[:1])
            calls.append((req.grid_point, req.index))
            times.append(float(req.model_sigma.reshape(-1)[0]))
            return torch.zeros_like(req.x)

        with torch.no_grad():
            answer(self._start(torch.zeros(1, 1)), record)
        expected = nfe(self._algo, len(self._grid), afs=self.config.afs, denoise_to_zero=self._dtz)
        assert len(asked) == expected, f"internal: {len(asked)} evaluations, nfe() says {expected}"
        self._calls, self._call_times = calls, torch.tensor(times, dtype=torch.float64)
        ts = self._table.timesteps(torch.cat(asked))
        if self.predictor is None:
            self._timestep_plans[key] = (ts.clone(), calls, self._call_times)
        return ts

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """VE noising x = x₀ + σ(t)·n (the scheduler's latent convention); flow mode: `scale_noise`."""
        if self._flow is not None:
            return self.scale_noise(original_samples, timesteps, noise)
        t = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().reshape(-1)
        s = timestep_to_sigma(t, self._table.sigma_table).to(original_samples.device, original_samples.dtype)
        return original_samples + bcast(s, original_samples) * noise

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor) -> torch.Tensor:
        """The flow forward process x_t = (1 − t)·x₀ + t·ε at a pipeline timestep (img2img's start): t is the
        exact flow time of that entry of `timesteps` (else timestep / T)."""
        if self._flow is None:
            raise SolverError("scale_noise is the flow-matching forward process; this is a VP scheduler (add_noise)")
        ts = torch.as_tensor(timestep).detach().to("cpu").reshape(-1)
        t = self._table.times(ts)
        if self._grid is not None:
            mine = self.timesteps.detach().to("cpu", torch.float32)
            for i, v in enumerate(ts.to(torch.float32)):
                hit = torch.nonzero(mine == v)
                if len(hit):
                    t[i] = self._call_times[int(hit[0])]
        return noised(sample, noise, t)
