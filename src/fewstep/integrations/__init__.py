"""Bridges to the ecosystem (docs/integrations.md has copy-paste snippets).

* `fewstep.integrations.diffusers`: `DiffusersDenoiser` (a diffusers UNet as D(x, σ)) and `FewstepScheduler`
  (any fewstep solver, AMED-Plugin included, inside an unchanged diffusers pipeline). Needs `fewstep[diffusers]`.
* `fewstep.integrations.kdiffusion`: `sample_<solver>(model, x, sigmas, extra_args, callback, disable, **options)`
  functions with k-diffusion's calling convention (k-diffusion / ComfyUI-style sampler loops).
* `fewstep.integrations.edm`: a `--model` factory for NVlabs EDM network-snapshot .pkl files.

The submodules are imported on demand so that `import fewstep` never needs the optional packages.
"""
