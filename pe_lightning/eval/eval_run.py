"""`pe-lightning eval export=DIR [key=value ...]`: an export's zero-shot and retrieval figures on the eval sets of
the current recipe with the overrides given, e.g. a validation world generated with another seed:

    pe-lightning data shapes --out data/shapes-val --seed 1 --train 200
    pe-lightning eval export=runs/default/pretrain/export data.root=data/shapes-val

Tune unpublished knobs on such a world and report the test sets: the recipes' figures are the test sets'.
The model is evaluated at its last training resolution (the export's recipe), as the clip_eval callback does.
Prints the figures as JSON; `out=FILE` also writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pe_lightning.config import RecipeError, split_words
from pe_lightning.eval.clip_sets import clip_figures, missing_sets
from pe_lightning.exports import Export
from pe_lightning.io import write_text_atomic


def last_resolution(recipe) -> int:
    phases = recipe.train.phases
    return int(phases[-1].resolution) if phases else int(recipe.data.image_size)


def evaluate_export(export: str | Path, overrides: list[str]) -> dict[str, float]:
    from pe_lightning.stages import load_stage_recipe

    found = Export.at(export, what="export")
    recipe = found.recipe
    if recipe is None:
        raise RecipeError(f"export={export}: no config.yaml beside the weights; give a stage's export/ folder")
    cfg = load_stage_recipe(str(recipe.stage), overrides)
    missing = missing_sets(cfg)
    if missing:
        raise RecipeError(f"eval set {missing[0]} does not exist: generate the world "
                          "(pe-lightning data shapes --out DIR) and pass data.root=DIR, or point eval.zeroshot / "
                          "eval.retrieval at existing sets")
    model = found.build_model().eval()
    with torch.no_grad():
        return clip_figures(model, cfg, last_resolution(recipe), torch.device("cpu"))


def main(args: list[str]) -> int:
    picked, rest = split_words(args, "export", "out")
    if not picked.get("export"):
        raise SystemExit("usage: pe-lightning eval export=DIR [out=FILE] [key=value ...]")
    figures = evaluate_export(picked["export"], rest)
    text = json.dumps(figures, indent=2, sort_keys=True)
    if picked.get("out"):
        write_text_atomic(picked["out"], text + "\n")
    print(text)
    return 0
