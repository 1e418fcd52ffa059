"""Bridges to the ecosystem (docs/integrations.md has copy-paste snippets).

* `fewstep.integrations.diffusers`: `DiffusersDenoiser` (a diffusers UNet as D(x, σ)), `DiffusersFlowDenoiser` (a
  flow transformer, SD3 / Flux / Wan, as the flow-frame D(x_t, t)) and `FewstepScheduler` (any fewstep solver,
  AMED-Plugin included, inside an unchanged diffusers pipeline, VP or flow). Needs `fewstep[diffusers]`.
* `fewstep.integrations.diffusers_dir` (with `diffusers_pipes`): `--model diffusers:DIR`, a local pipeline folder
  (SD 1.x/2.x, SDXL, SD3, Flux) as a fewstep model for every command (prompts, guidance, VAE decoding).
* `fewstep.integrations.kdiffusion`: `sample_<solver>(model, x, sigmas, extra_args, callback, disable, **options)`
  functions with k-diffusion's calling convention (k-diffusion / ComfyUI-style sampler loops; ComfyUI's flow
  "CONST" convention with `flow=True` or from the model wrapper).
* `fewstep.integrations.edm`: a `--model` factory for NVlabs EDM network-snapshot .pkl files.

The submodules are imported on demand so that `import fewstep` never needs the optional packages.
"""
