"""builders.py: which teacher weights a distillation run takes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import builders
from errors import UserError


def teacher_args(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"distillation_type": "hard", "teacher_path": "",
                              "teacher_model": "regnety_160", "model": "deit_tiny_patch16_224", **kw})


@pytest.mark.parametrize("name,expected", [("regnety_160", "regnety_160.deit_in1k"),
                                           ("resnet50", "resnet50")])
def test_teacher_without_path_is_deits(monkeypatch, capsys, name, expected):
    """Without --teacher-path, hard distillation takes timm's copy of DeiT's RegNetY-16GF
    (the `deit_in1k` tag: DeiT's regnety_160-a5fe301d.pth), not timm's default regnety_160
    tag, and says which weights it loads; other names keep timm's default tag."""
    asked = {}

    def fake_create_model(model_name, pretrained=False, **kw):
        asked.update(name=model_name, pretrained=pretrained, **kw)
        return torch.nn.Linear(2, kw.get("num_classes", 1000))

    monkeypatch.setattr(builders.timm, "create_model", fake_create_model)
    monkeypatch.setattr(builders, "download_problem", lambda name: None)  # as if online
    builders.build_teacher(teacher_args(teacher_model=name), 10, torch.device("cpu"))
    assert asked == {"name": expected, "pretrained": True, "num_classes": 10}
    assert f"teacher: timm's pretrained {expected}" in capsys.readouterr().out


def test_offline_teacher_name_fails_at_once(monkeypatch):
    """No network (or HF_HUB_OFFLINE) and no cached weights: one line naming --teacher-path,
    before timm waits for the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(builders.timm, "create_model", lambda *a, **k: pytest.fail("tried timm"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE.*--teacher-path FILE"):
        builders.build_teacher(teacher_args(teacher_model="regnety_160"), 10, torch.device("cpu"))


def test_no_teacher_without_distillation():
    assert builders.build_teacher(teacher_args(distillation_type="none"), 10, "cpu") is None


def test_input_size_follows_the_model_unless_given(capsys):
    """Without --input-size the data are sized for the model: the name's 384 px, a dims
    file's img_size; an explicit flag wins, and says so when it overrides the dims file."""
    import argparse
    from models import revit_dims

    def size(model, dims=None, given=None):
        args = argparse.Namespace(model=model, input_size=given)
        builders.resolve_input_size(args, dims)
        return args.input_size
    assert size("deit_base_distilled_patch16_384", revit_dims(176)) == 384
    assert size("deit_tiny_patch16_224") == 224
    sixty_four = revit_dims(176).with_frame(img_size=64, patch_size=16)
    assert size("deit_base_distilled_patch16_384", sixty_four) == 64
    capsys.readouterr()
    assert size("deit_base_distilled_patch16_384", sixty_four, given=32) == 32
    assert "--input-size 32 replaces the dims file's img_size 64" in capsys.readouterr().out
