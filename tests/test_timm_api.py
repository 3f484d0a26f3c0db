"""timm's model API on our models as timm's own ViTs honour it (part of issue 11): the cfg
machinery, head_hidden_size, reset_classifier(0), forward_intermediates, features_only,
prune_intermediate_layers, group_matcher and gradient checkpointing; on registered names, on
what build_model returns, on a pruned compact model, and against timm's DeiT itself."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2

import models
from pruning import Gates, compact

DIMS = {"embed_dim": 32, "num_heads": [2, 4, 2], "qk_dim": [8, 8, 16], "v_dim": [8, 16, 8],
        "mlp_dim": [48, 64, 32]}
FRAME = dict(img_size=32, patch_size=8)


def registered(name: str, **kw):
    if name == "revit":
        kw["dims"] = DIMS
    return timm.create_model(name, **FRAME, num_classes=10, **kw)


def pruned_compact():
    torch.manual_seed(0)
    model = models.build_model("deit_tiny_distilled_patch16_224", dims=models.Dims(**DIMS),
                               num_classes=10, **FRAME)
    gates = Gates.attach(model)
    gates.remove("emb", 0, [1, 7, 30])
    gates.remove("head", 1, [0])
    gates.remove("qk", 2, [3])
    gates.remove("mlp", 0, list(range(10)))
    return compact(model)


MODELS = {
    "revit_tiny_distilled_patch16_224": lambda: registered("revit_tiny_distilled_patch16_224"),
    "revit_small_distilled_patch16_224": lambda: registered("revit_small_distilled_patch16_224"),
    "revit": lambda: registered("revit"),
    "build_model (DeiT, no distillation)": lambda: models.build_model(
        "deit_tiny_patch16_224", dims=models.Dims(**DIMS), num_classes=10, **FRAME),
    "pruned compact": pruned_compact,
    # the encoders' structures: pre-norm, QuickGELU and qk-norm in one; packed SwiGLU
    "CLIP-style with qk-norm": lambda: models.build_model(
        "vit_base_patch16_clip_quickgelu_224", qk_norm=True, dims=models.Dims(**DIMS),
        num_classes=10, **FRAME),
    "DINOv2-g's packed SwiGLU": lambda: models.build_model(
        "vit_giant_patch14_dinov2", dims=models.Dims(**DIMS), num_classes=10, **FRAME),
    "SigLIP's attention pool": lambda: models.build_model(
        "vit_base_patch16_siglip_224", dims=models.Dims(**DIMS), num_classes=10, **FRAME),
    # timm's Eva: rotary (a table as wide as the heads), Q and V biases; with and without
    # the learned position embedding, LayerScale named gamma_1/gamma_2
    "EVA-02's rotary and packed SwiGLU": lambda: models.build_model(
        "eva02_tiny_patch14_224", dims=models.Dims(**{**DIMS, "qk_dim": [8, 8, 8]}),
        num_classes=10, **FRAME),
    "EVA-02 CLIP's q/k/v layers, norms and SwiGLU": lambda: models.build_model(
        "eva02_base_patch16_clip_224", dims=models.Dims(**{**DIMS, "qk_dim": [8, 8, 8]}),
        num_classes=10, **FRAME),
    "RoPE ViT": lambda: models.build_model(
        "vit_small_patch16_rope_224", dims=models.Dims(**{**DIMS, "qk_dim": [16, 16, 16]}),
        num_classes=10, **FRAME),
}


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


# ------------------------------------------- the APIs timm's generic model tests exercise
def _eager(model, x):
    with torch.no_grad():
        return model(x)


def test_every_registered_name_builds_with_its_defaults():
    """timm builds every registered name with no arguments; `revit` without dims is ReViT-T."""
    names = timm.list_models("revit*")
    assert set(names) >= {"revit", "revit_tiny_distilled_patch16_224",
                          "revit_small_distilled_patch16_224"}
    bare = timm.create_model("revit").eval()
    assert bare.dims == timm.create_model("revit_tiny_distilled_patch16_224").dims
    out = _eager(bare, torch.randn(1, *bare.pretrained_cfg["input_size"]))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_forward_and_backward(model):
    """Eval: one logits tensor; train: every parameter gets a gradient (a distilled model
    returns both heads, as timm's DeiT)."""
    x = torch.randn(2, 3, 32, 32)
    assert _eager(model, x).shape == (2, 10)
    model.train()
    out = model(x)
    out = torch.cat(out) if isinstance(out, tuple) else out
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_default_cfg_names_real_layers(model):
    state = model.state_dict()
    classifier = model.pretrained_cfg["classifier"]
    for name in (classifier if isinstance(classifier, (tuple, list)) else [classifier]):
        assert f"{name}.weight" in state
    assert f"{model.pretrained_cfg['first_conv']}.weight" in state
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape == (1, model.dims.num_tokens, model.num_features)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)


def test_torchscript_gives_the_eager_logits(model):
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(model)
    assert torch.equal(_eager(scripted, x), _eager(model, x))


def test_fx_tracing_in_eval_and_train(model):
    """torch.fx traces the model (attention is a leaf: its padding plan reads the tensors'
    device and dtype); the traced module gives the eager logits, and in train mode the same
    gradients, and it scripts (FX then TorchScript)."""
    x = torch.randn(2, 3, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    want = _eager(model, x)
    assert torch.equal(_eager(traced, x), want)
    assert torch.equal(_eager(torch.jit.script(traced), x), want)
    model.train()
    grads = []
    for m in (model, torch.fx.symbolic_trace(model)):
        model.zero_grad()
        torch.manual_seed(0)
        out = m(x)
        (torch.cat(out) if isinstance(out, tuple) else out).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_feature_extraction_by_fx_matches_forward_intermediates(model):
    """torchvision's create_feature_extractor (what timm's FX feature wrapper uses) returns
    the block outputs forward_intermediates gives."""
    from torchvision.models.feature_extraction import create_feature_extractor
    x = torch.randn(2, 3, 32, 32)
    extractor = create_feature_extractor(model, return_nodes={"blocks.0": "b0", "blocks.2": "b2"})
    feats = _eager(extractor, x)
    with torch.no_grad():
        _, maps = model.forward_intermediates(x, indices=[0, 2], output_fmt="NLC")
    n = model.num_prefix_tokens
    assert torch.equal(feats["b0"][:, n:], maps[0]) and torch.equal(feats["b2"][:, n:], maps[1])
    from timm.models import create_feature_extractor as timm_extractor  # timm's FX wrapper
    feats = _eager(timm_extractor(model, return_nodes={"blocks.2": "b2"}), x)
    assert torch.equal(feats["b2"][:, n:], maps[1])


def test_cfg_describes_the_model(model):
    assert model.default_cfg is model.pretrained_cfg or model.default_cfg == model.pretrained_cfg
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.pretrained_cfg["num_classes"] == model.num_classes == 10
    assert model.pretrained_cfg["first_conv"] == "patch_embed.proj"
    assert resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)
    assert model.head_hidden_size == model.num_features == model.embed_dim


def test_reset_classifier_to_a_backbone(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), torch.nn.Identity)
        assert model.num_classes == 0 and model.dims.num_classes == 0
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7)


def test_forward_intermediates_are_the_block_outputs(model):
    x = torch.randn(2, 3, 32, 32)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in model.blocks]
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[0, 2])
        for h in hooks:
            h.remove()
        torch.testing.assert_close(final, model.forward_features(x))
        n = model.num_prefix_tokens
        for m, out in zip(maps, (seen[0], seen[2])):
            assert m.shape == (2, model.embed_dim, 4, 4)
            torch.testing.assert_close(m.flatten(2).transpose(1, 2), out[:, n:])
        last = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True,
                                           return_prefix_tokens=True, norm=True)
        (patches, prefix), = last
        assert patches.shape == (2, 16, model.embed_dim) and prefix.shape[1] == n
        torch.testing.assert_close(torch.cat([prefix, patches], 1), final)
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers_keeps_what_is_asked(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, (want,) = model.forward_intermediates(x, indices=[1])
        assert model.prune_intermediate_layers([1], prune_norm=True) == [1]
        assert len(model.blocks) == 2 == model.dims.depth and model.num_classes == 0
        _, (got,) = model.forward_intermediates(x, indices=[1])
        torch.testing.assert_close(got, want)


def test_gradient_checkpointing_gives_the_same_gradients_gates_included():
    torch.manual_seed(0)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        m = models.build_model("deit_tiny_distilled_patch16_224", dims=models.Dims(**DIMS),
                               num_classes=10, **FRAME).train()
        gates = Gates.attach(m)
        gates.remove("emb", 0, [3])
        m.set_grad_checkpointing(checkpointing)
        out = m(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        sum(o.square().mean() for o in out).backward()
        grads.append([p.grad for p in m.parameters()] + [t.grad for t in gates.tensors()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_features_only_and_layer_decay_through_timm():
    f = registered("revit_tiny_distilled_patch16_224", features_only=True, out_indices=(3, 11))
    maps = f(torch.randn(2, 3, 32, 32))
    assert [m.shape for m in maps] == [(2, 176, 4, 4)] * 2
    assert f.feature_info.channels() == [176, 176] and f.feature_info.reduction() == [8, 8]
    m = registered("revit")
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == len(m.blocks) + 2  # stem, each block, the head


def test_our_distilled_deit_matches_timms_api(tmp_path):
    """The same weights: pre-logits (the mean of both tokens) and forward_intermediates agree
    with timm's DeiT."""
    torch.manual_seed(0)
    ref = timm.create_model("deit_tiny_distilled_patch16_224", **FRAME, num_classes=10).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "timm.pth")
    ours = models.build_model("deit_tiny_distilled_patch16_224", checkpoint=tmp_path / "timm.pth",
                              img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   ref.forward_head(ref.forward_features(x), pre_logits=True))
        a = ours.forward_intermediates(x, indices=[2, 11], return_prefix_tokens=True)
        b = ref.forward_intermediates(x, indices=[2, 11], return_prefix_tokens=True)
        torch.testing.assert_close(a[0], b[0])
        for (pa, xa), (pb, xb) in zip(a[1], b[1]):
            torch.testing.assert_close(pa, pb)
            torch.testing.assert_close(xa, xb)


def test_a_backbone_prunes_compacts_and_reloads(tmp_path):
    """num_classes 0 (Identity heads, as timm): gates, compaction and our checkpoints work."""
    torch.manual_seed(0)
    m = models.build_model("deit_tiny_distilled_patch16_224", dims=models.Dims(**DIMS),
                           num_classes=0, **FRAME).eval()
    gates = Gates.attach(m)
    gates.remove("emb", 0, [1, 2])
    gates.remove("v", 1, [0])
    small = compact(m).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        live = [i for i in range(32) if i not in (1, 2)]  # the gated model's pooled features
        torch.testing.assert_close(small(x), m(x)[:, live])
        torch.save({"model": small.state_dict(), "dims": small.dims.to_dict()}, tmp_path / "b.pth")
        again = models.build_model("deit_base_patch16_224", checkpoint=tmp_path / "b.pth").eval()
        assert again.num_classes == 0 and again(x).shape == (2, 30)
        torch.testing.assert_close(again(x), small(x))
