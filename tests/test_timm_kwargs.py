"""timm's model kwargs (global_pool, fc_norm, class_token, reg_tokens, qkv_bias, init_values,
no_embed_class, ...) through build_model and the scripts' --gp/--model-kwargs, and checkpoints
whose tensors cannot tell how they were built: timm's logits, or one line that says what to
give, never a silent guess."""
from __future__ import annotations

import argparse

import pytest
import timm
import torch
import yaml

import models
from errors import UserError
from helpers import DENSE_DIMS, FAST, PRUNE_FLAGS, assert_user_error, run_here

NAME = "vit_small_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=10)
HEADS = dict(num_heads=3)  # what a state dict cannot tell: a kwarg, as to timm


def tiny_timm(name: str = NAME, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    vit = timm.create_model(name, **{**TINY, **kwargs})
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    return vit.eval()


def save(vit, path, **extra):
    torch.save({"state_dict": vit.state_dict(), **extra}, path)
    return path


def max_diff(ours, theirs, size: int = 32) -> float:
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(x)
        assert ref.abs().max() > 0.1
        return (ours.eval()(x) - ref).abs().max().item()


@pytest.mark.parametrize("kwargs", [
    dict(global_pool="avg"),                       # fc_norm follows avg pooling in timm
    dict(global_pool="avg", fc_norm=False),
    dict(fc_norm=True),                            # token pooling with fc_norm
    dict(class_token=False, global_pool="avg", reg_tokens=2),
    dict(qkv_bias=False, init_values=1e-5),
    dict(reg_tokens=4, no_embed_class=True),
], ids=["avg", "avg_no_fc_norm", "token_fc_norm", "no_cls_regs", "no_qkv_bias_ls", "regs"])
def test_kwargs_describe_the_checkpoint(kwargs, tmp_path):
    """A state dict trained with non-default kwargs loads under the plain name with the same
    kwargs and gives timm's logits bitwise; so does a model built from the kwargs alone."""
    vit = tiny_timm(**kwargs)
    path = save(vit, tmp_path / "vit.pth")
    ours = models.build_model(NAME, checkpoint=path, **HEADS, **kwargs)
    assert max_diff(ours, vit) == 0.0
    fresh = models.build_model(NAME, **{**TINY, **kwargs}).dims
    assert (fresh.global_pool, fresh.fc_norm, fresh.class_token, fresh.reg_tokens) == (
        ours.dims.global_pool, ours.dims.fc_norm, ours.dims.class_token, ours.dims.reg_tokens)


def test_drop_path_rate_is_taken_as_timm_takes_it():
    m = models.build_model(NAME, drop_path_rate=0.2, **TINY)
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_pooling_the_tensors_cannot_tell_is_never_guessed(tmp_path):
    """An avg-pooled ViT (class token and fc_norm) under a token-pooled name built token
    pooling plus fc_norm, logits off by about 1, silently: now it is refused in one line,
    and taken from the kwargs or from timm's train.py args saved in the checkpoint."""
    vit = tiny_timm(global_pool="avg")
    path = save(vit, tmp_path / "avg.pth")
    with pytest.raises(UserError, match="global_pool='avg' or 'token'") as e:
        models.build_model(NAME, checkpoint=path, **HEADS)
    assert e.value.field == "global_pool" and "\n" not in str(e.value)
    saved = save(vit, tmp_path / "train_py.pth",
                 args=argparse.Namespace(model=NAME, gp="avg", model_kwargs=HEADS))
    assert max_diff(models.build_model(NAME, checkpoint=saved), vit) == 0.0
    # the explicit kwarg wins over what the checkpoint recorded
    token = tiny_timm(fc_norm=True)
    saved = save(token, tmp_path / "token.pth",
                 args=argparse.Namespace(gp="avg", model_kwargs={}))
    ours = models.build_model(NAME, checkpoint=saved, global_pool="token", fc_norm=True, **HEADS)
    assert max_diff(ours, token) == 0.0
    # and a checkpoint without fc_norm under a name with avg pooling is refused too
    plain = save(tiny_timm(), tmp_path / "plain.pth")
    with pytest.raises(UserError, match="no fc_norm and a class token"):
        models.build_model(NAME, checkpoint=plain, global_pool="avg", **HEADS)


def test_uncovered_and_unknown_kwargs_are_one_line():
    with pytest.raises(UserError, match="MLP activation") as e:
        models.build_model(NAME, act_layer="gelu_tanh", **TINY)
    assert "act_layer='gelu_tanh'" in str(e.value)
    with pytest.raises(UserError, match="timm refuses it") as e:
        models.build_model(NAME, no_such_kwarg=1, **TINY)
    assert e.value.field == "model_kwargs"
    with pytest.raises(UserError, match="global_pool='max'"):
        models.build_model(NAME, global_pool="max", **TINY)


@pytest.mark.parametrize("img_size", [28, 56])
def test_dinov2_with_registers_at_any_size_timm_takes(img_size, tmp_path):
    """At 28 px the 4 patches are fewer than the 5 prefix tokens: reading the position
    embedding's token count crashed (isqrt of a negative number)."""
    name = "vit_small_patch14_reg4_dinov2"
    vit = tiny_timm(name, img_size=img_size, patch_size=14)
    path = save(vit, tmp_path / "dino.pth")
    ours = models.build_model(name, checkpoint=path, **HEADS)
    assert ours.dims.img_size == img_size and ours.dims.reg_tokens == 4
    assert max_diff(ours, vit, img_size) == 0.0


# ----------------------------------------------------------------------------- the scripts
def test_gp_and_model_kwargs_flags_reach_the_model_and_args_yaml(tmp_path):
    """--gp and --model-kwargs as timm's train.py has them: an avg-pooled dense model prunes
    with --gp avg (refused without it), and args.yaml records both, so -c repeats the run."""
    dims = models.Dims(**DENSE_DIMS)
    torch.manual_seed(0)
    m = models.build_model("deit_tiny_patch16_224", dims=dims, img_size=32, patch_size=8,
                           num_classes=10, global_pool="avg", fc_norm=True)
    assert m.dims.global_pool == "avg" and m.dims.fc_norm
    dense = tmp_path / "dense.pth"
    torch.save({"state_dict": m.state_dict()}, dense)  # a uniform timm-layout state dict
    fast = [a if a != "deit_tiny_distilled_patch16_224" else "deit_tiny_patch16_224"
            for a in FAST]
    common = [*fast, "--pruning", "--cost", "macs", *PRUNE_FLAGS[1:], "--pretrained-path", dense,
              "--epochs", "1", "--latency_target", "0.9", "--pruning_exit"]
    proc = run_here("nvit_prune.py", *common, "--model-kwargs", "num_heads=4",
                    "--output_dir", tmp_path / "no")
    assert_user_error(proc, "--gp", "global_pool='avg' or 'token'")
    out = tmp_path / "o"
    given = {"num_heads": 4, "fc_norm": True}
    proc = run_here("nvit_prune.py", *common, "--gp", "avg", "--model-kwargs", "num_heads=4",
                    "fc_norm=True", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = yaml.safe_load((out / "args.yaml").read_text())
    assert recorded["gp"] == "avg" and recorded["model_kwargs"] == given
    import nvit_prune
    again = nvit_prune.get_args_parser().parse_args(["-c", str(out / "args.yaml")])
    assert again.gp == "avg" and again.model_kwargs == given
    pruned = torch.load(out / "pruned_checkpoint.pth", weights_only=True)
    assert pruned["dims"]["global_pool"] == "avg" and pruned["dims"]["fc_norm"]


def test_a_malformed_model_kwarg_is_one_line():
    import nvit_prune
    with pytest.raises(SystemExit) as e:
        nvit_prune.get_args_parser().parse_args(["--model-kwargs", "fc_norm"])
    assert e.value.code == 2
