"""Turn the recipe's `callbacks:` list into Lightning callbacks.

A callback is named either by a short registered name, which is the file `callbacks/<name>.py` of this
repository, or by `path/to/file.py:ClassName` for a user's own file anywhere. The library never imports
the `callbacks/` folder as a package, so nothing named `callbacks` is installed into site-packages.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from pe_lightning.errors import UserError

CALLBACKS_DIR = Path(__file__).resolve().parent.parent / "callbacks"


class CallbackError(UserError, ValueError):
    """A callback spec that names no file, no class, or passes arguments the class does not take."""


def registered_names() -> list[str]:
    return sorted(p.stem for p in CALLBACKS_DIR.glob("*.py") if not p.stem.startswith("_"))


def _load_file(path: Path) -> ModuleType:
    module_name = f"pe_lightning_callbacks.{path.stem}_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CallbackError(f"cannot import callback file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so the class pickles and its checkpoints name it
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise
    return module


def _callback_classes(module: ModuleType) -> dict[str, type]:
    return {name: obj for name, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, L.Callback) and obj.__module__ == module.__name__}


def resolve_class(name: str) -> type[L.Callback]:
    """`checkpoint` -> callbacks/checkpoint.py's one Callback class; `dir/file.py:Class` -> that class;
    `dir/file.py` -> that file's one Callback class."""
    if ":" in name or name.endswith(".py"):  # a file: `dir/file.py:Class`, or `dir/file.py` with one class
        file_part, _, class_name = name.partition(":") if ":" in name else (name, "", None)
        path = Path(file_part).expanduser()
        if not path.is_file():
            raise CallbackError(f"callback {name!r}: no file {path}")
    else:
        path, class_name = CALLBACKS_DIR / f"{name}.py", None
        if not path.is_file():
            raise CallbackError(f"unknown callback {name!r}; registered names: {registered_names()}, "
                                "or give path/to/file.py:ClassName")
    classes = _callback_classes(_load_file(path))
    if class_name is None:
        if len(classes) != 1:
            raise CallbackError(f"{path} defines {len(classes)} Callback classes {sorted(classes)}; "
                                f"name one as {path}:ClassName")
        return next(iter(classes.values()))
    if class_name not in classes:
        raise CallbackError(f"callback {name!r}: {path} has no Callback class {class_name!r}; "
                            f"it defines {sorted(classes)}")
    return classes[class_name]


def instantiate(name: str, args: dict[str, Any], cfg: DictConfig, stage_root: Path) -> L.Callback:
    """Build one callback. Classes whose __init__ takes `cfg` or `stage_root` receive them."""
    cls = resolve_class(name)
    params = inspect.signature(cls.__init__).parameters
    kwargs = dict(args)
    if "cfg" in params:
        kwargs.setdefault("cfg", cfg)
    if "stage_root" in params:
        kwargs.setdefault("stage_root", stage_root)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise CallbackError(f"callback {name!r}: {err}; {cls.__name__} takes {inspect.signature(cls)}") from err
    return cls(**kwargs)


def build_callbacks(cfg: DictConfig, stage_root: Path) -> list[L.Callback]:
    return [instantiate(spec.name, OmegaConf.to_container(spec.args, resolve=True), cfg, Path(stage_root))
            for spec in cfg.callbacks]
