"""Train the AMED predictors `fewstep demo` ships: AMED-Solver and AMED-Plugin (iPNDM, DEIS) at NFE 5 on every
built-in model, with the demo's own recipe and settings (`fewstep.demo.DemoSettings`; conditional models with
their null label, as the demo samples them), into `src/fewstep/data/predictors/MODEL/RECIPE-nfe5/` (weights and
settings only). Resumable: work folders under `runs/ship_predictors/`.

    python benchmarks/ship_predictors.py [--models digits,gmm]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from fewstep.amed.checkpoint import SETTINGS, WEIGHTS
from fewstep.amed.recipes import recipe
from fewstep.amed.train import train
from fewstep.demo import AMED_RECIPES, PICTURE_NFE, DemoSettings
from fewstep.models import BUILTIN_MODELS, load_model
from fewstep.shipped import PREDICTORS_DIR


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(BUILTIN_MODELS), help="comma-separated built-in models")
    p.add_argument("--work", default="runs/ship_predictors", help="work folder (resumable)")
    args = p.parse_args()
    for name in args.models.split(","):
        model = load_model(name)
        if model.num_classes:
            model = dataclasses.replace(model, num_classes=0, cond_denoiser=None)
        s = DemoSettings.of(model)
        for recipe_name in AMED_RECIPES.values():
            cfg = recipe(recipe_name, PICTURE_NFE, model.frame.final_denoise, kimg=s.kimg, pool=s.pool, batch=s.batch)
            folder = Path(args.work) / name / f"{recipe_name}-nfe{PICTURE_NFE}"
            _, _, stats = train(model, cfg, out=folder, progress=False)
            dest = PREDICTORS_DIR / name / folder.name
            dest.mkdir(parents=True, exist_ok=True)
            for file in (WEIGHTS, SETTINGS):
                shutil.copyfile(folder / file, dest / file)
            print(f"{name} {recipe_name}: {stats['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
