"""The command line: `pe-lightning train|pipeline|status|data ...` (the Makefile calls these).

  pe-lightning train stage=pretrain [recipe=pretrain_vanilla] [run=NAME] [key=value ...]
  pe-lightning pipeline [run=NAME] [probes=false] [key=value ...]
  pe-lightning status [run=NAME] [runs_dir=runs]
  pe-lightning report [run=NAME] [runs_dir=runs]      runs/<run>/report.md + PNGs
  pe-lightning eval export=DIR [out=FILE] [key=value ...]  an export's CLIP figures on the recipe's eval sets
  pe-lightning ablation [ladder=FILE] [run=ablation] [rungs=0,7] [seeds=0] [repeat_seeds=1,2] [key=value ...]
  pe-lightning data shapes --out DIR [--train N] [--seed S] [--size PX]
  pe-lightning probe run=NAME [stage=S | weights=PATH model=PRESET] [layers=1,2,4]
  pe-lightning probe compare OUT.png EXPORT_OR_PROBE_JSON ...
  pe-lightning teacher oracle|sam2 --data SHARDS --out DIR [--grid 32] [--tokens 8] [--dim 128] [...]
  pe-lightning teacher clip --data SHARDS --out DIR --weights TEACHER.pt [--model PRESET] [...]
  pe-lightning ask run=NAME image=PATH "question"      (or export=DIR instead of run=; question=TEXT)
"""

from __future__ import annotations

import logging
import os
import sys

from pe_lightning.config import split_words

USAGE = __doc__


def _train(args: list[str]) -> None:
    picked, overrides = split_words(args, "stage", "recipe")
    if "stage" not in picked:
        raise SystemExit("usage: pe-lightning train stage=NAME [recipe=FILE] [key=value ...]")
    _refuse_a_stage_in_use(picked["stage"], overrides)
    from pe_lightning.pipeline import run_stage
    from pe_lightning.stages import load_stage_recipe

    cfg = load_stage_recipe(picked["stage"], overrides, recipe=picked.get("recipe"))
    run_stage(cfg)


def _refuse_a_stage_in_use(stage: str, overrides: list[str]) -> None:
    """A stage another live process trains is refused in a second or two, before torch and the stages load
    (the stage manager takes the lock itself later; this is the early answer)."""
    from pathlib import Path

    from pe_lightning.config import RecipeConfig
    from pe_lightning.runlock import refuse_if_held

    if any(os.environ.get(key, "0") != "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")):
        return  # another rank of a run whose rank 0 holds the lock (Lightning re-runs the command per rank)
    words, _ = split_words(overrides, "run", "runs_dir")
    refuse_if_held(Path(words.get("runs_dir", RecipeConfig.runs_dir)) / words.get("run", RecipeConfig.run) / stage)


def _pipeline(args: list[str]) -> None:
    from pe_lightning.pipeline import run_pipeline

    picked, overrides = split_words(args, "run", "probes")
    probes = picked.get("probes", "true").lower()
    if probes not in ("true", "false"):
        raise SystemExit(f"probes={picked['probes']}: expected true or false")
    run_pipeline(picked.get("run", "default"), overrides, probes=probes == "true")


def _status(args: list[str]) -> None:
    from pe_lightning.pipeline import status

    picked, rest = split_words(args, "run", "runs_dir", "stage")
    print(status(picked.get("runs_dir", "runs"), picked.get("run", "default")))


def _report(args: list[str]) -> None:
    from pe_lightning.report import main as report_main

    print(report_main(args))


def _eval(args: list[str]) -> None:
    from pe_lightning.eval.eval_run import main as eval_main

    raise SystemExit(eval_main(args))


def _ablation(args: list[str]) -> None:
    from pe_lightning.ablation import main as ablation_main

    ablation_main(args)


def _data(args: list[str]) -> None:
    if not args or args[0] != "shapes":
        raise SystemExit("usage: pe-lightning data shapes --out DIR [--train N] [--seed S] [--size PX]")
    from pe_lightning.data.shapes.cli import main as shapes_main

    raise SystemExit(shapes_main(args[1:]))


def _probe(args: list[str]) -> None:
    from pe_lightning.eval.probe_run import main as probe_main

    raise SystemExit(probe_main(args))


def _teacher(args: list[str]) -> None:
    if args and args[0] == "clip":
        from pe_lightning.teachers.clip_cli import main as clip_main

        raise SystemExit(clip_main(args[1:]))
    from pe_lightning.teachers.cli import main as teacher_main

    raise SystemExit(teacher_main(args))


def _ask(args: list[str]) -> None:
    """Answer a question about an image with a lang export (runs/<run>/lang/export, or export=DIR)."""
    from pathlib import Path

    from pe_lightning.stages.lang import ask_image, load_lang_export

    picked, rest = split_words(args, "run", "runs_dir", "export", "image", "question", "max_new_tokens")
    question = picked.get("question") or " ".join(rest).strip()
    if "image" not in picked or not question:
        raise SystemExit('usage: pe-lightning ask run=NAME image=PATH "question"  (or export=DIR)')
    export = picked.get("export") or Path(picked.get("runs_dir", "runs")) / picked.get("run", "default") / "lang" / "export"
    lang = load_lang_export(export)
    print(ask_image(lang, picked["image"], question, int(picked.get("max_new_tokens", 16))))


def _configure_logging() -> None:
    """Our messages prefixed on stderr; Lightning keeps its own handler (no duplicated lines)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[pe-lightning] %(message)s"))
    ours = logging.getLogger("pe_lightning")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


COMMANDS = {"train": _train, "pipeline": _pipeline, "status": _status, "report": _report, "eval": _eval,
            "ablation": _ablation, "data": _data, "probe": _probe, "teacher": _teacher, "ask": _ask}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
        print(USAGE)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help", "help") else 2)
    # OpenMP threads that spin while waiting steal the cores from the data workers on small CPU machines.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _configure_logging()
    from tqdm.contrib.logging import logging_redirect_tqdm

    from pe_lightning.errors import USER_ERRORS
    from pe_lightning.quiet import quiet_start

    quiet_start()
    try:
        # Our lines through tqdm.write: each on its own line above a progress bar, never on the bar's line.
        with logging_redirect_tqdm(loggers=[logging.getLogger("pe_lightning")]):
            COMMANDS[argv[0]](argv[1:])
    except USER_ERRORS as err:
        if os.environ.get("PE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
