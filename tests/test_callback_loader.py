"""Callbacks by registered name and by file path, with clear errors."""

import lightning as L
import pytest

from pe_lightning.callback_loader import CallbackError, instantiate, registered_names, resolve_class
from pe_lightning.stages import load_stage_recipe


def test_stock_callbacks_are_registered_by_file_name():
    assert {"checkpoint", "clip_eval", "throughput"} <= set(registered_names())
    assert resolve_class("checkpoint").__name__ == "AtomicCheckpoint"


def test_user_file_by_path_with_arguments(tmp_path):
    path = tmp_path / "my_cb.py"
    path.write_text("import lightning as L\n"
                    "class Helper:\n    pass\n"
                    "class Counter(L.Callback):\n"
                    "    def __init__(self, start=0):\n        self.count = start\n")
    cb = instantiate(f"{path}:Counter", {"start": 5}, load_stage_recipe("pretrain"), tmp_path)
    assert isinstance(cb, L.Callback) and cb.count == 5
    assert type(resolve_class(str(path) + ":Counter")) is type(cb.__class__)


@pytest.mark.parametrize("name, message", [
    ("no_such_callback", r"unknown callback 'no_such_callback'; registered names: \[.*checkpoint"),
    ("/nowhere/cb.py:Foo", "no file /nowhere/cb.py"),
])
def test_bad_names(name, message):
    with pytest.raises(CallbackError, match=message):
        resolve_class(name)


def test_bad_class_and_bad_arguments(tmp_path):
    path = tmp_path / "cb.py"
    path.write_text("import lightning as L\nclass A(L.Callback):\n    def __init__(self, x=1):\n        pass\n"
                    "class B(L.Callback):\n    pass\n")
    with pytest.raises(CallbackError, match=r"no Callback class 'C'.*\['A', 'B'\]"):
        resolve_class(f"{path}:C")
    with pytest.raises(CallbackError, match="defines 2 Callback classes"):
        resolve_class(str(path))  # ambiguous without :Class
    with pytest.raises(CallbackError, match="unexpected keyword argument 'y'"):
        instantiate(f"{path}:A", {"y": 2}, load_stage_recipe("pretrain"), tmp_path)
