"""A parent's weights, as a stage reads them: a finished stage's `export/` folder or a bare weights file.

    parent = Export.at("runs/default/video/export")    # model.pt + model.json + config.yaml + metrics.json
    parent = Export.at("PE-Core-L14-336.pt")            # a released Meta file: the model comes from a preset
    model = parent.build_model()                         # a PECLIP with the parent's own structure and weights

An export folder records the model's exact structure (`model.json`: the CLIPConfig, truncation and
LayerScale included), so a parent is rebuilt as it was trained, whatever the child stage's own preset is.
A bare file has no such record: the caller names the preset it was trained as.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from pe_lightning.errors import UserError

WEIGHTS = "model.pt"
MODEL_JSON = "model.json"
RECIPE = "config.yaml"
METRICS = "metrics.json"


class ExportError(UserError, FileNotFoundError):
    """A parent export or weights file that is missing or incomplete."""


@dataclass(frozen=True)
class Export:
    weights: Path  # Meta-layout weights (model.pt, or the bare file)
    folder: Optional[Path] = None  # the export/ folder; None for a bare file

    @classmethod
    def at(cls, path: str | Path, what: str = "weights") -> "Export":
        path = Path(path).expanduser()
        if path.is_dir():
            if not (path / WEIGHTS).is_file():
                raise ExportError(f"{what}: {path} is a folder without {WEIGHTS}; give a stage's export/ folder "
                                  "or a weights file")
            return cls(path / WEIGHTS, path)
        if path.is_file():
            return cls(path, path.parent if path.name == WEIGHTS and (path.parent / MODEL_JSON).is_file() else None)
        raise ExportError(f"{what}={path}: no such file. Give the path of a weights file (a stage's "
                          "export/model.pt or a released Meta PE-*.pt) or an export/ folder")

    @property
    def recipe(self) -> Optional[DictConfig]:
        """The resolved recipe of the stage that wrote this export (None for a bare file)."""
        if self.folder is None or not (self.folder / RECIPE).is_file():
            return None
        return OmegaConf.load(self.folder / RECIPE)

    @property
    def metrics(self) -> dict[str, Any]:
        if self.folder is None or not (self.folder / METRICS).is_file():
            return {}
        return json.loads((self.folder / METRICS).read_text())

    def model_config(self, preset: Optional[str] = None, vision: Optional[dict] = None,
                     text: Optional[dict] = None):
        """The CLIPConfig of these weights: the export's own `model.json`, else the preset given."""
        from pe_lightning.models.presets import CLIPConfig, get_preset

        if self.folder is not None and (self.folder / MODEL_JSON).is_file():
            cfg = CLIPConfig.from_dict(json.loads((self.folder / MODEL_JSON).read_text()))
            cfg.vision.use_mask_token = False  # a training-time token, never exported
            cfg.vision.grad_checkpointing = False
            return cfg
        if preset is None:
            raise ExportError(f"{self.weights} is a bare weights file: name the model preset it was trained as")
        return get_preset(preset, vision=dict(vision or {}), text=dict(text or {}))

    def build_model(self, preset: Optional[str] = None, vision: Optional[dict] = None,
                    text: Optional[dict] = None):
        """A PECLIP (or vision-only PECLIP) with this export's structure and weights, loaded strictly."""
        from pe_lightning.models import PECLIP, load_checkpoint

        model = PECLIP(self.model_config(preset, vision, text))
        load_checkpoint(model, self.weights)
        return model


def write_model_json(model: Any, out_dir: Path) -> None:
    """Record the exported model's exact structure beside its weights (see the module docstring)."""
    from pe_lightning.io import write_text_atomic

    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        write_text_atomic(out_dir / MODEL_JSON, json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
