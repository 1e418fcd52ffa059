"""The network hooks of a `FewstepScheduler` run (a mixin of `diffusers_scheduler`), active only during a run:
AMED-Plugin's (the `mid_block` features of the call at t_n, and the exact per-sample timesteps of its inserted
points) and a flow pipeline's input hook (with `unet=pipe.transformer`: the network gets the state the solver
asked for, e.g. AFS's first call, which is not at the pipeline's latents x_1 = ε).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SolverError


class NetworkHooks:
    """Forward hooks on the pipeline's network (see the module docstring)."""

    _hooks: list[Any]
    unet: nn.Module | None
    predictor: Any
    _flow: Any  # the flow settings (None: a VP scheduler)
    _table: Any
    _grid: torch.Tensor | None
    _done: bool
    _armed: torch.Tensor | None  # per-row model timesteps while an AMED network call is pending
    _captured: torch.Tensor | None
    _step_index: int | None
    timesteps: torch.Tensor

    def _arm_hooks(self) -> None:
        """Install the network hooks of a run: AMED's, and a flow pipeline's input hook (with `unet=`)."""
        if self.predictor is not None or (self._flow is not None and self.unet is not None):
            self._install_hooks()

    def _install_hooks(self) -> None:
        unet = self.unet

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            if self._flow is not None:
                return self._flow_input(args, kwargs)
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

    def _flow_input(self, args: tuple, kwargs: dict) -> tuple | None:
        """The flow network's input, substituted by the pre-hook: the pending state (AFS's first call is not at
        the pipeline's latents x_1) and, with AMED, the exact per-sample timesteps in the pipeline's units."""
        if self._grid is None or self._done:
            return None
        key = None if args else next((k for k in ("hidden_states", "sample", "x") if k in kwargs), None)
        if not args and key is None:
            raise SolverError("the flow network was called without its latents as hidden_states=")
        latents = args[0] if args else kwargs[key]
        x = self.scale_model_input(latents)
        args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, key: x})
        if self._armed is not None:
            passed = kwargs.get("timestep")
            if passed is None:
                raise SolverError("AMED-Plugin in a flow pipeline needs the network called with timestep=")
            value, expected = float(torch.as_tensor(passed).flatten()[0]), float(self.timesteps[self._step_index])
            unit = 1 / self._table.scale if abs(value * self._table.scale - expected) < abs(value - expected) else 1.0
            t = self._armed.repeat(latents.shape[0] // self._armed.shape[0]) * unit
            kwargs = {**kwargs, "timestep": t.to(device=latents.device, dtype=torch.as_tensor(passed).dtype)}
        return args, kwargs
