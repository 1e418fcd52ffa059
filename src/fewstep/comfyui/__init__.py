"""fewstep as a ComfyUI node pack: Fewstep Sampler, Fewstep Sigmas, Fewstep Card and Fewstep AMED.

ComfyUI finds the nodes through `NODE_CLASS_MAPPINGS`: from the `comfyui.custom_nodes` entry point of the
installed package (the pip-installable ComfyUI), or from a one-line file in ComfyUI's `custom_nodes/` folder
(`python -m fewstep.comfyui install ComfyUI/custom_nodes` writes it). Every model family works: EPS, V_PREDICTION
and EDM in fewstep's EDM frame, CONST (flow: SD3, Flux, Wan) in its flow frame, read from the model's
`model_sampling`. Nothing here imports ComfyUI until a node runs (docs/integrations.md, "ComfyUI nodes").
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
