"""The stage manager: runs a stage in runs/<run>/<stage>/, resumes it, exports it, chains the stages.

runs/<run>/<stage>/
  config.yaml            the resolved recipe of the run (written when the stage starts fresh)
  checkpoints/last.ckpt  Lightning state for resuming (model, optimizer, samples seen, data position)
  progress.json          samples seen and step at the last checkpoint (cheap to read for `status`)
  tb/                    TensorBoard logs
  export/                weights in Meta's layout + config.yaml + metrics.json, written atomically
  DONE                   written last: the stage is finished and its export is complete
A stage reads only its parents' export/, never their checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pe_lightning.config import RECIPES_DIR, RecipeError, load_recipe, result_keys, to_yaml
from pe_lightning.stages import STAGE_NAMES, StageNotAvailable, stage_class

log = logging.getLogger("pe_lightning")


class PipelineError(RuntimeError):
    """A stage cannot run as asked: a missing parent, a conflicting resume, an unavailable stage."""


@dataclass(frozen=True)
class StageDir:
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoints" / "last.ckpt"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def done(self) -> Path:
        return self.root / "DONE"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def weights(self) -> Path:
        return self.export / "model.pt"


def stage_dir(cfg: DictConfig, stage: str | None = None) -> StageDir:
    return StageDir(Path(cfg.runs_dir) / cfg.run / (stage or cfg.stage))


def read_pipeline(path: Path = RECIPES_DIR / "pipeline.yaml") -> dict[str, list[str]]:
    """Stage name -> parent names, in run order."""
    spec = OmegaConf.load(path)
    order = {name: list(node.get("parents", [])) for name, node in spec.stages.items()}
    for name, parents in order.items():
        unknown = [p for p in parents + [name] if p not in STAGE_NAMES]
        if unknown:
            raise PipelineError(f"{path}: unknown stage(s) {unknown}; known stages: {list(STAGE_NAMES)}")
    return order


def parent_exports(cfg: DictConfig, pipeline: dict[str, list[str]]) -> dict[str, Path]:
    """The export/ of each parent of this stage, or an error naming the stage to run first."""
    exports = {}
    for parent in pipeline.get(cfg.stage, []):
        parent_dir = stage_dir(cfg, parent)
        if not parent_dir.done.exists():
            raise PipelineError(
                f"stage {cfg.stage!r} starts from the export of {parent!r}, which is not finished in "
                f"{parent_dir.root}. Run it first: make stage={parent} run={cfg.run} "
                f"(or give weights directly with init=PATH)")
        exports[parent] = parent_dir.export
    return exports


def init_weights(cfg: DictConfig, pipeline: dict[str, list[str]]) -> Path | None:
    """The weights a fresh stage starts from: `init=` if given, else its first parent's export."""
    if cfg.init:
        path = Path(cfg.init)
        if not path.exists():
            raise PipelineError(f"init={cfg.init}: no such file. Give the path of a weights file "
                                "(a stage's export/model.pt or a released Meta PE-*.pt)")
        return path
    exports = parent_exports(cfg, pipeline)
    return next(iter(exports.values())) / "model.pt" if exports else None


def config_changes(saved: DictConfig, current: DictConfig) -> list[str]:
    """Keys whose values differ between a saved and a current recipe, among those that change results."""
    old, new = result_keys(saved), result_keys(current)
    return sorted(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in set(old) | set(new) if old.get(k) != new.get(k))


def resume_checkpoint(cfg: DictConfig, sdir: StageDir) -> Path | None:
    """The checkpoint to resume from, after refusing the ambiguous and the inconsistent cases."""
    if not sdir.checkpoint.exists():
        return None
    if cfg.init:
        raise PipelineError(
            f"init={cfg.init} asks to start {cfg.stage!r} from new weights, but {sdir.checkpoint} holds an "
            f"unfinished run of it. Resume it (drop init=), or start over by deleting {sdir.root}")
    if sdir.config.exists() and cfg.resume != "force":
        changes = config_changes(OmegaConf.load(sdir.config), cfg)
        if changes:
            raise PipelineError(
                f"refusing to resume {sdir.root}: the recipe changed since it started:\n  "
                + "\n  ".join(changes) + "\nRestore these keys, or pass resume=force to resume anyway.")
    return sdir.checkpoint


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def export_stage(module: Any, cfg: DictConfig, sdir: StageDir) -> None:
    """Write export/ through a temporary folder renamed into place, then DONE."""
    tmp = sdir.root / "export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    module.export(tmp)
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    metrics = {**module.metrics, "samples_seen": module.samples_seen, "train_seconds": module.train_seconds}
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if sdir.export.exists():
        shutil.rmtree(sdir.export)
    os.replace(tmp, sdir.export)
    write_atomic_text(sdir.done, json.dumps({"samples_seen": module.samples_seen}) + "\n")


def run_stage(cfg: DictConfig, pipeline: dict[str, list[str]] | None = None) -> Path:
    """Run (or resume, or skip when DONE) one stage; returns its export folder."""
    from pe_lightning.trainer import fit_stage

    pipeline = pipeline if pipeline is not None else read_pipeline()
    sdir = stage_dir(cfg)
    if sdir.done.exists():
        log.info("stage %s of run %s is DONE (%s); nothing to do", cfg.stage, cfg.run, sdir.export)
        return sdir.export
    try:
        stage_cls = stage_class(cfg.stage)
    except StageNotAvailable as err:
        raise PipelineError(str(err)) from err
    ckpt = resume_checkpoint(cfg, sdir)
    weights = None if ckpt else init_weights(cfg, pipeline)
    sdir.root.mkdir(parents=True, exist_ok=True)
    if ckpt:
        log.info("resuming stage %s from %s", cfg.stage, ckpt)
    else:
        write_atomic_text(sdir.config, to_yaml(cfg))
        log.info("starting stage %s in %s%s", cfg.stage, sdir.root, f" from {weights}" if weights else "")
    module, trainer = fit_stage(stage_cls, cfg, sdir, ckpt=ckpt, init_weights=weights)
    if not trainer.is_global_zero:
        return sdir.export
    if not module.finished:
        raise PipelineError(f"stage {cfg.stage} stopped at {module.samples_seen} of "
                            f"{cfg.train.total_samples} samples; run the same command again to resume")
    export_stage(module, cfg, sdir)
    log.info("stage %s DONE: %s", cfg.stage, sdir.export)
    return sdir.export


def run_pipeline(run: str, overrides: list[str], recipe_dir: Path = RECIPES_DIR) -> None:
    """Run every stage of the pipeline that is not DONE, in order."""
    pipeline = read_pipeline(recipe_dir / "pipeline.yaml")
    for stage in pipeline:
        try:
            stage_class(stage)  # an unbuilt stage stops the pipeline with a clear error, never a skip
        except StageNotAvailable as err:
            raise PipelineError(str(err)) from err
        cfg = load_recipe(stage, [f"run={run}", *overrides], recipe_dir)
        run_stage(cfg, pipeline)


def stage_status(cfg_run_dir: Path, stage: str) -> str:
    sdir = StageDir(cfg_run_dir / stage)
    if sdir.done.exists():
        metrics_file = sdir.export / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        headline = {k: metrics[k] for k in ("zeroshot_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1",
                                             "retrieval_t2i_r1", "samples_seen") if k in metrics}
        return "done " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in headline.items())
    if sdir.progress.exists():
        progress = json.loads(sdir.progress.read_text())
        return f"interrupted at {progress['samples_seen']} samples (step {progress['step']}); rerun to resume"
    if sdir.root.exists():
        return "started, no checkpoint yet"
    return "not started"


def status(runs_dir: str, run: str) -> str:
    """One line per stage of the pipeline: not started, interrupted at N samples, or done with metrics."""
    lines = [f"run {run} ({Path(runs_dir) / run})"]
    for stage in read_pipeline():
        try:
            stage_class(stage)
            state = stage_status(Path(runs_dir) / run, stage)
        except StageNotAvailable:
            state = "not available yet"
        lines.append(f"  {stage:<9} {state}")
    return "\n".join(lines)


__all__ = ["PipelineError", "RecipeError", "StageDir", "read_pipeline", "run_pipeline", "run_stage", "status"]
