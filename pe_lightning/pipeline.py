"""The stage manager: runs a stage in runs/<run>/<stage>/, resumes it, exports it, chains the stages.

runs/<run>/<stage>/
  config.yaml            the resolved recipe of the run (written when the stage starts fresh)
  checkpoints/last.ckpt  Lightning state for resuming (model, optimizer, samples seen, data position)
  progress.json          samples seen and step at the last checkpoint (cheap to read for `status`)
  tb/                    TensorBoard logs
  export/                weights in Meta's layout + model.json + config.yaml + metrics.json, written atomically
  DONE                   written last: the stage is finished and its export is complete
A stage reads only its parents' export/, never their checkpoints. Parents have roles (recipes/pipeline.yaml):
`init` weights are loaded on a fresh start only; a `teacher` is rebuilt from its export on every start.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from pe_lightning.config import RECIPES_DIR, RecipeError, recipe_schema, result_keys, to_yaml
from pe_lightning.errors import UserError
from pe_lightning.exports import Export
from pe_lightning.io import replace_dir_atomic, write_text_atomic
from pe_lightning.run_length import check_run_length
from pe_lightning.progress import LockProgress
from pe_lightning.runlock import StageLock, holder, launches_the_run
from pe_lightning.stages import STAGES, StageNotAvailable, load_stage_recipe, stage_class

log = logging.getLogger("pe_lightning")

ROLES = ("init", "teacher")


class PipelineError(UserError, RuntimeError):
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


Pipeline = dict[str, dict[str, str]]  # stage -> {role: parent stage}, in run order


def read_pipeline(path: Path = RECIPES_DIR / "pipeline.yaml") -> Pipeline:
    """Stage name -> {role: parent}, in run order; parents must come earlier, roles must be known."""
    spec = OmegaConf.load(path)
    order: Pipeline = {}
    for name, node in spec.stages.items():
        parents = dict(node or {})
        bad_roles = sorted(set(parents) - set(ROLES))
        if bad_roles:
            raise PipelineError(f"{path}: stage {name!r} has unknown parent role(s) {bad_roles}; roles: {list(ROLES)}")
        late = [p for p in parents.values() if p not in order]
        if late:
            raise PipelineError(f"{path}: stage {name!r} names parent(s) {late} that are not listed before it")
        order[str(name)] = {str(k): str(v) for k, v in parents.items()}
    return order


def _override(cfg: DictConfig, role: str) -> str | None:
    """`init=PATH` (root key) or `<stage>.teacher=PATH` (a stage's own key) replaces that parent."""
    if role == "init":
        return cfg.init
    section = cfg.get(cfg.stage)
    return section.get(role) if section is not None and role in section else None


def parent_exports(cfg: DictConfig, pipeline: Pipeline, fresh: bool = True) -> dict[str, Export]:
    """role -> Export of this stage's parents, or an error naming the stage to run first. On resume a
    missing `init` parent is tolerated (its weights are in the checkpoint; only its `parent_` figures go)."""
    stage_cls = stage_class(cfg.stage)
    exports: dict[str, Export] = {}
    parents = dict(pipeline.get(cfg.stage, {}))
    for role in stage_cls.roles:
        given = _override(cfg, role)
        if given:
            key = "init" if role == "init" else f"{cfg.stage}.{role}"
            exports[role] = Export.at(given, what=key)
            continue
        parent = parents.get(role)
        if parent is None:
            continue
        parent_dir = stage_dir(cfg, parent)
        if not parent_dir.done.exists():
            if role == "init" and not fresh:
                continue
            hint = "init=PATH" if role == "init" else f"{cfg.stage}.{role}=PATH"
            raise PipelineError(
                f"stage {cfg.stage!r} needs the export of {parent!r} as its {role}, which is not finished in "
                f"{parent_dir.root}. Run it first: make stage={parent} run={cfg.run} (or give weights with {hint})")
        exports[role] = Export.at(parent_dir.export, what=f"{role} parent {parent}")
    return exports


def config_changes(saved: DictConfig, current: DictConfig) -> list[str]:
    """Keys whose values differ between a saved and a current recipe, among those that change results. A key
    the saved recipe lacks (a run started before the key existed) counts at its schema default."""
    old, new = result_keys(saved), result_keys(current)
    defaults = result_keys(recipe_schema(str(current.stage), stage_class(str(current.stage)).Args))
    old = {**{k: v for k, v in defaults.items() if k in new}, **old}
    return sorted(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in set(old) | set(new) if old.get(k) != new.get(k))


def resume_checkpoint(cfg: DictConfig, sdir: StageDir) -> Path | None:
    """The checkpoint to resume from, after refusing the ambiguous and the inconsistent cases."""
    if not sdir.checkpoint.exists() or cfg.resume == "never":
        return None
    saved = OmegaConf.load(sdir.config) if sdir.config.exists() else None
    started_from = saved.get("init") if saved is not None else None
    if cfg.init and cfg.init != started_from:
        raise PipelineError(
            f"init={cfg.init} asks to start {cfg.stage!r} from new weights, but {sdir.checkpoint} holds an "
            f"unfinished run of it (started from {started_from or 'its pipeline parent'}). Resume it (drop init= "
            f"or repeat the one it started with), or start over by deleting {sdir.root}")
    changes = changes_since(saved, cfg)
    if changes:
        raise PipelineError(
            f"refusing to resume {sdir.root}: the recipe changed since it started:\n  "
            + "\n  ".join(changes) + "\nRestore these keys, or pass resume=force to resume anyway.")
    return sdir.checkpoint


def changes_since(saved: DictConfig | None, cfg: DictConfig) -> list[str]:
    """What a command's recipe changed against a run's saved one: nothing to refuse under resume=force."""
    return [] if saved is None or cfg.resume == "force" else config_changes(saved, cfg)


def refuse_a_changed_done_stage(cfg: DictConfig, sdir: StageDir) -> None:
    """A DONE stage is skipped, so its figures would silently stand for a recipe that has changed since (a
    ladder rung after a default changed): name the changes instead. resume=force keeps the old export."""
    changes = changes_since(OmegaConf.load(sdir.config) if sdir.config.exists() else None, cfg)
    if changes:
        raise PipelineError(
            f"{sdir.root} is DONE with another recipe than this command's:\n  " + "\n  ".join(changes)
            + f"\nDelete {sdir.root} (or use another run=) to train this recipe, or pass resume=force to keep "
            "the finished export.")


def export_stage(module: Any, cfg: DictConfig, sdir: StageDir) -> None:
    """Write export/ through a temporary folder swapped into place, then DONE."""
    def build(tmp: Path) -> None:
        module.export(tmp)
        write_text_atomic(tmp / "config.yaml", to_yaml(cfg))
        metrics = {**module.metrics, "samples_seen": module.samples_seen, "train_seconds": module.train_seconds}
        write_text_atomic(tmp / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))

    replace_dir_atomic(build, sdir.export)
    write_text_atomic(sdir.done, json.dumps({"samples_seen": module.samples_seen}) + "\n")


def build_stage(cfg: DictConfig, pipeline: Pipeline, ckpt: Path | None):
    """The stage module with its parents read (before anything is written, so bad weights leave no folder)."""
    stage_cls = stage_class(cfg.stage)
    check_run_length(cfg)
    parents = parent_exports(cfg, pipeline, fresh=ckpt is None)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return stage_cls(cfg, parents=parents, fresh=ckpt is None)


def run_stage(cfg: DictConfig, pipeline: Pipeline | None = None) -> Path:
    """Run (or resume, or skip when DONE) one stage, holding its lock; returns its export folder. A start
    that fails before the first checkpoint removes the stage folder it created (no config.yaml, no TensorBoard
    file left for `status` to call "started")."""
    pipeline = pipeline if pipeline is not None else read_pipeline()
    sdir = stage_dir(cfg)
    if not launches_the_run():  # the other ranks of a DDP run: the launching process holds the lock
        return _run_stage(cfg, pipeline, sdir)
    created = [d for d in (sdir.root.parent.parent, sdir.root.parent, sdir.root) if not d.exists()]  # runs/, run, stage
    with StageLock(sdir.root) as lock:
        try:
            return _run_stage(cfg, pipeline, sdir, lock)
        except BaseException:
            if created and not sdir.checkpoint.exists():
                shutil.rmtree(created[0], ignore_errors=True)
            raise


def _run_stage(cfg: DictConfig, pipeline: Pipeline, sdir: StageDir, lock: StageLock | None = None) -> Path:
    from pe_lightning.trainer import fit_stage

    if sdir.done.exists():
        refuse_a_changed_done_stage(cfg, sdir)
        log.info("stage %s of run %s is DONE (%s); nothing to do", cfg.stage, cfg.run, sdir.export)
        return sdir.export
    ckpt = resume_checkpoint(cfg, sdir)
    if ckpt and not cfg.init:
        # The parent a run started from stays its parent on resume (its parent_ figures, a blend with it),
        # whether or not the command repeats init= (a parent file gone since is tolerated, as before).
        started_from = OmegaConf.load(sdir.config).get("init") if sdir.config.exists() else None
        if started_from and Path(started_from).exists():
            cfg = cfg.copy()
            cfg.init = started_from
    module = build_stage(cfg, pipeline, ckpt)
    sdir.root.mkdir(parents=True, exist_ok=True)
    if ckpt:
        log.info("resuming stage %s from %s", cfg.stage, ckpt)
    else:
        write_text_atomic(sdir.config, to_yaml(cfg))
        init = module.parents.get("init")
        log.info("starting stage %s in %s%s", cfg.stage, sdir.root, f" from {init.weights}" if init else "")
    extra = [LockProgress(lock, cfg.train.log_every_n_steps)] if lock else []
    trainer = fit_stage(module, sdir.root, ckpt, extra)
    if not trainer.is_global_zero:
        return sdir.export
    if not module.finished:
        raise PipelineError(f"stage {cfg.stage} stopped at {module.samples_seen} of "
                            f"{cfg.train.total_samples} samples; run the same command again to resume")
    export_stage(module, cfg, sdir)
    log.info("stage %s DONE: %s", cfg.stage, sdir.export)
    return sdir.export


def probe_stage(cfg: DictConfig) -> None:
    """The per-layer probes of a finished stage's export (runs/<run>/<stage>/probe/), unless already there.
    They need a labelled set: the shapes world's, or the data root's own (probe_run.probe_set_dir)."""
    from pe_lightning.eval.probe_run import run_probe

    if (stage_dir(cfg).root / "probe" / "probe.json").exists():
        return
    log.info("probing the export of stage %s (per-layer kNN, linear and dense probes)", cfg.stage)
    run_probe([f"run={cfg.run}", f"stage={cfg.stage}", f"runs_dir={cfg.runs_dir}", f"data_root={cfg.data.root}"])


def stage_overrides(pipeline: Pipeline, overrides: list[str]) -> dict[str, list[str]]:
    """Each stage's share of the pipeline's `key=value` words. `STAGE:key=value` goes to that stage alone
    (`lang:train.batch_size=16`), and so does a key of a stage's own section (`lang.lm=PATH`); `init=PATH`
    goes to the stages with no parent (pretrain, the chain's root: every later stage starts from its parents'
    exports); every other word goes to all stages."""
    shares: dict[str, list[str]] = {stage: [] for stage in pipeline}
    for word in overrides:
        key, eq, _ = word.partition("=")
        stage, colon, _ = key.partition(":")
        section = key.partition(".")[0]
        if eq and colon:
            if stage not in shares:
                raise PipelineError(f"{word}: {stage!r} is not a stage of the pipeline; stages: {list(shares)}")
            shares[stage].append(word[len(stage) + 1:])
        elif section in shares:  # a stage's own section (lang.lm=...): that stage's key
            shares[section].append(word)
        elif key == "init":
            for root in (s for s, parents in pipeline.items() if not parents):
                shares[root].append(word)
        else:
            for share in shares.values():
                share.append(word)
    return shares


def run_pipeline(run: str, overrides: list[str], recipe_dir: Path = RECIPES_DIR, probes: bool = True) -> None:
    """Run every stage of the pipeline that is not DONE, in order, each export probed after its stage."""
    pipeline = read_pipeline(recipe_dir / "pipeline.yaml")
    missing = [s for s in pipeline if s not in STAGES]
    if missing:  # an unbuilt stage stops the pipeline before anything runs, never a silent skip
        raise PipelineError(f"the pipeline lists stage(s) {missing} that are not available in this version; "
                            f"available: {sorted(STAGES)}")
    shares = stage_overrides(pipeline, overrides)
    for stage in pipeline:
        cfg = load_stage_recipe(stage, [f"run={run}", *shares[stage]], recipes_dir=recipe_dir)
        run_stage(cfg, pipeline)
        if probes and rank_zero_only.rank == 0:  # one process probes; the others go on to the next stage
            probe_stage(cfg)


def _headline(stage: str, metrics: dict) -> str:
    """The stage's one figure (with its gain over the baseline it must beat), then its other headline keys."""
    cls = stage_class(stage)
    keys = [*cls.headline_metrics, "samples_seen", "data_skipped"]
    details = ", ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                        for k in keys if k in metrics)
    return f"{cls.headline.format(metrics)} | {details}" if cls.headline else details


def stage_status(run_dir: Path, stage: str) -> str:
    sdir = StageDir(run_dir / stage)
    if sdir.done.exists():
        metrics_file = sdir.export / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        return "done " + _headline(stage, metrics)
    running = holder(sdir.root)
    if running:
        return f"running ({running.describe()})"
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
        state = stage_status(Path(runs_dir) / run, stage) if stage in STAGES else "not available yet"
        lines.append(f"  {stage:<9} {state}")
    return "\n".join(lines)


__all__ = ["PipelineError", "RecipeError", "StageDir", "StageNotAvailable", "read_pipeline", "run_pipeline",
           "run_stage", "status", "parent_exports", "resume_checkpoint", "export_stage", "build_stage"]
