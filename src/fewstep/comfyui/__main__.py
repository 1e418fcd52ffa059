"""`python -m fewstep.comfyui install CUSTOM_NODES_DIR`: write the one-line custom node that loads the pack."""

from __future__ import annotations

import sys
from pathlib import Path

SHIM_NAME = "fewstep_nodes.py"
SHIM = ('"""fewstep\'s ComfyUI nodes (written by `python -m fewstep.comfyui install`; the pack lives in the '
        'installed fewstep package)."""\n\n'
        "from fewstep.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401\n")


def install(custom_nodes: str | Path) -> Path:
    """Write `fewstep_nodes.py` into ComfyUI's custom_nodes folder (which must exist)."""
    folder = Path(custom_nodes).expanduser()
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder (give ComfyUI's custom_nodes folder)")
    path = folder / SHIM_NAME
    path.write_text(SHIM, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "install":
        print("usage: python -m fewstep.comfyui install PATH/TO/ComfyUI/custom_nodes", file=sys.stderr)
        return 2
    print(f"wrote {install(args[1])}; restart ComfyUI (the nodes need fewstep installed in ComfyUI's Python)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
