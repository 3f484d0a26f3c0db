"""The global pruner: groups, minimum widths, the stop rule, latency-aware ranking, optimizer clean-up."""
import pytest
import torch

import models
from models import Dims
from pruning import Gates, Saliency, compact
from pruning.cost import MacsCost, ParamsCost
from pruning.optim_state import clear_pruned_state
from pruning.pruner import GlobalPruner

DIMS = Dims(embed_dim=64, num_heads=[4, 6, 4], qk_dim=[16, 16, 24], v_dim=[16, 24, 16],
            mlp_dim=[128, 96, 64])
GROUPS = {"emb": 16, "head": 2, "qk": 8, "v": 8, "mlp": 16}


def setup(target=0.5, per_iter=40, lam=0.0, cost_cls=MacsCost, seed=0, rank_cost_cls=None):
    torch.manual_seed(seed)
    model = models.build_model("deit_tiny_distilled_patch16_224", dims=DIMS, img_size=32,
                               patch_size=8, num_classes=5)
    gates = Gates.attach(model)
    saliency = Saliency(gates, "hessian")
    rank_cost = rank_cost_cls(model.dims) if rank_cost_cls else None
    pruner = GlobalPruner(gates, saliency, cost_cls(model.dims), target, per_iter, GROUPS, lam,
                          rank_cost=rank_cost)
    return model, gates, saliency, pruner


def backward(model, gates, saliency, n=2):
    for _ in range(n):
        x = torch.randn(4, 3, 32, 32)
        out = model(x)
        loss = sum(o.logsumexp(-1).mean() for o in out)
        loss.backward()
        saliency.accumulate()
        gates.zero_grad()
        model.zero_grad()


def test_widths_stay_group_multiples_and_minimums():
    model, gates, saliency, pruner = setup(target=0.05, per_iter=10_000)
    backward(model, gates, saliency)
    result = pruner.step(model)
    assert result.stuck and not result.reached  # 5% is below what the minimum widths allow
    w = gates.widths()
    assert w["embed_dim"] == 16
    assert w["num_heads"] == [2, 2, 2]
    assert w["qk_dim"] == [8, 8, 8] and w["v_dim"] == [8, 8, 8]
    assert w["mlp_dim"] == [16, 16, 16]
    assert pruner.ratio() == pytest.approx(pruner.minimum_ratio())
    # the compact model of the result is buildable and has exactly these widths
    c = compact(model)
    assert c.dims.mlp_dim == [16, 16, 16] and c.dims.embed_dim == 16


def test_partial_steps_keep_multiples_and_equal_head_widths():
    model, gates, saliency, pruner = setup(target=0.3, per_iter=24)
    for _ in range(4):
        backward(model, gates, saliency)
        pruner.step(model)
        w = gates.widths()  # raises if QK/V widths differ across live heads
        assert w["embed_dim"] % 16 == 0
        assert all(m % 16 == 0 for m in w["mlp_dim"])
        assert all(q % 8 == 0 for q in w["qk_dim"]) and all(v % 8 == 0 for v in w["v_dim"])
        assert all(h % 2 == 0 and h >= 2 for h in w["num_heads"])


def test_stop_rule_stops_at_first_group_below_target():
    model, gates, saliency, pruner = setup(target=0.8, per_iter=10_000)
    backward(model, gates, saliency)
    result = pruner.step(model)
    assert result.reached and result.ratio <= 0.8
    # undoing the last removal puts the cost back above the target: no group too many
    kind, block, units = result.removed_units[-1]
    with torch.no_grad():
        if kind == "emb":
            gates.emb[units] = 1
        elif kind in ("qk", "v"):
            hs, ds = zip(*units)
            gates.blocks[block][kind][list(hs), list(ds)] = 1
        else:
            gates.blocks[block][kind][units] = 1
    assert pruner.ratio() > 0.8


def test_per_step_quota():
    model, gates, saliency, pruner = setup(target=0.1, per_iter=20)
    backward(model, gates, saliency)
    result = pruner.step(model)
    removed = sum(result.removed.values())
    assert 20 <= removed < 20 + 16 * 6  # stops after the group that crosses the quota
    assert not result.reached


class FixedScores:
    """Saliency stand-in: fixed per-unit scores, to check the ranking itself."""

    def __init__(self, gates, low_kind, low_block, low_units):
        self.scores = {"emb": torch.ones_like(gates.emb.detach()),
                       "blocks": [{k: torch.ones_like(v.detach()) for k, v in b.items()}
                                  for b in gates.blocks]}
        target = self.scores["emb"] if low_kind == "emb" else self.scores["blocks"][low_block][low_kind]
        target[low_units] = 0.0

    def step(self, model=None):
        return self.scores


@pytest.mark.parametrize("kind,block,units", [("mlp", 1, list(range(40, 56))),
                                              ("emb", None, list(range(3, 19))),
                                              ("head", 2, [0, 3])])
def test_lowest_saliency_group_goes_first(kind, block, units):
    model, gates, saliency, pruner = setup(target=0.1, per_iter=1)
    pruner.saliency = FixedScores(gates, kind, block, units)
    result = pruner.step(model)
    assert len(result.removed_units) == 1
    got_kind, got_block, got_units = result.removed_units[0]
    assert (got_kind, got_block, sorted(got_units)) == (kind, block, units)


@pytest.mark.parametrize("additive,first", [(True, "head"), (False, "mlp")])
def test_per_unit_criteria_compare_groups_by_mean(additive, first):
    """hessian/taylor scores add up over a group; magnitude/random are per-unit, so a group
    of 2 heads must not beat a group of 16 neurons just by having fewer units."""
    model, gates, saliency, pruner = setup(target=0.1, per_iter=1)
    fixed = FixedScores(gates, "mlp", 1, [])
    for b in fixed.scores["blocks"]:
        b["head"].fill_(0.9)
        b["mlp"].fill_(0.95)
    fixed.scores["blocks"][1]["mlp"][:16] = 0.5  # mean 0.5, sum 8 > a head pair's 1.8
    fixed.additive = additive
    pruner.saliency = fixed
    result = pruner.step(model)
    assert result.removed_units[0][0] == first


def test_latency_penalty_prefers_costly_groups():
    """With a large lambda the cost drop dominates: the first removal is the candidate with
    the largest cost drop, whatever its saliency; with lambda 0 the cheapest saliency wins."""
    picks = {}
    for lam in (0.0, 1e9):
        model, gates, saliency, pruner = setup(target=0.1, per_iter=1, lam=lam, cost_cls=ParamsCost)
        backward(model, gates, saliency)
        result = pruner.step(model)
        picks[lam] = result.removed_units[0][:2]
    # the largest parameter drop of one group in DIMS is an embedding group (16 channels
    # through every block)
    assert picks[1e9] == ("emb", None)


class MlpHeavyCost(MacsCost):
    """A ranking cost that only sees MLP width: with a large lambda the pruner must take
    MLP groups first, whatever MACs say."""

    name = "macs"

    def block(self, embed_dim, num_heads, qk_dim, v_dim, mlp_dim):
        return 1e9 * mlp_dim


def test_rank_cost_ranks_and_stop_cost_stops():
    model, gates, saliency, pruner = setup(target=0.8, per_iter=10_000, lam=1e6,
                                           rank_cost_cls=MlpHeavyCost)
    backward(model, gates, saliency)
    scores = saliency.step(model)
    cands = pruner.candidates(scores)
    drops = {(c.kind, c.block): c.cost_drop for c in cands}
    assert drops[("mlp", 0)] == pytest.approx(16.0)  # 16 neurons x 1e9 MACs, in GMACs
    assert drops[("head", 1)] == 0.0 and drops[("emb", None)] < 1e-3  # emb: the stem only
    pruner.saliency = None  # the scores given are used: no second saliency (EMA) step
    result = pruner.step(model, scores)
    assert {k for k, _, _ in result.removed_units} == {"mlp"}
    # the stop rule still uses the pruner's own cost (real MACs), not the ranking cost
    macs = MacsCost(model.dims)
    assert result.ratio == pytest.approx(macs.total(compact(model).dims) / macs.total(model.dims))
    assert result.reached and result.ratio <= 0.8


def test_target_validation():
    with pytest.raises(ValueError, match="target"):
        setup(target=0.0)
    with pytest.raises(ValueError, match="target"):
        setup(target=1.0)


def test_clear_pruned_state_zeroes_only_pruned_entries():
    model, gates, saliency, pruner = setup(target=0.5, per_iter=30)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    (out[0].sum() + out[1].sum()).backward()
    opt.step()
    saliency.accumulate()
    result = pruner.step(model)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
              for p in model.parameters()}
    clear_pruned_state(opt, model, result.removed_units)
    changed = zero_after = 0
    for p in model.parameters():
        for k, v in opt.state[p].items():
            if not torch.is_tensor(v) or v.shape != p.shape:
                continue
            diff = before[id(p)][k] != v
            changed += int(diff.sum())
            zero_after += int((v[diff] == 0).sum())
    assert changed > 0 and zero_after == changed  # only zeroing happened
    # every removed MLP neuron's fc1 row has a zero state
    for kind, block, units in result.removed_units:
        if kind == "mlp":
            st = opt.state[model.blocks[block].mlp.fc1.weight]
            assert torch.all(st["exp_avg"][units] == 0)
