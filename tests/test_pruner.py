"""The global pruner: groups, minimum widths, the stop rule, latency-aware ranking, optimizer clean-up."""
import pytest
import torch

import models
from models import Dims
from pruning import Gates, Saliency, compact
from pruning.cost import MacsCost, ParamsCost
from pruning.units import clear_pruned_state
from pruning.pruner import GlobalPruner
from pruning.saliency import CRITERIA_BY_NAME

DIMS = Dims(embed_dim=64, num_heads=[4, 6, 4], qk_dim=[16, 16, 24], v_dim=[16, 24, 16],
            mlp_dim=[128, 96, 64])
GROUPS = {"emb": 16, "head": 2, "qk": 8, "v": 8, "mlp": 16}


def setup(target=0.5, per_iter=40, lam=0.0, cost_cls=MacsCost, seed=0, rank_cost_cls=None,
          units="shared", budget=None):
    torch.manual_seed(seed)
    model = models.build_model("deit_tiny_distilled_patch16_224", dims=DIMS, img_size=32,
                               patch_size=8, num_classes=5)
    gates = Gates.attach(model, qkv_units=units)
    saliency = Saliency(gates, "hessian")
    rank_cost = rank_cost_cls(model.dims) if rank_cost_cls else None
    pruner = GlobalPruner(gates, saliency, cost_cls(model.dims), target, per_iter, GROUPS, lam,
                          budget=budget, rank_cost=rank_cost)
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
    first = pruner.step(model)
    assert sum(first.removed.values()) == 1  # the reference's first step: one group
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
    for units in ("shared", "per_head"):
        model, gates, saliency, pruner = setup(target=0.3, per_iter=64, units=units)
        for _ in range(4):
            backward(model, gates, saliency)
            pruner.step(model)
            w = gates.widths()  # raises if QK/V widths differ across live heads
            assert w["embed_dim"] % 16 == 0
            assert all(m % 16 == 0 for m in w["mlp_dim"])
            assert all(q % 8 == 0 for q in w["qk_dim"]) and all(v % 8 == 0 for v in w["v_dim"])
            assert all(h % 2 == 0 and h >= 2 for h in w["num_heads"])


class FixedScores:
    """Saliency stand-in: fixed per-unit scores (unit shape), to check the ranking itself.
    With `seed`, embedding and MLP units score low and at random, everything else high, so
    that no layer runs down to its last group within a few steps."""

    def __init__(self, gates, low_kind=None, low_block=None, low_units=(), seed=None):
        units = gates.to_units([t.detach() for t in gates.tensors()])
        if seed is None:
            scores = [torch.ones_like(u, dtype=torch.float64) for u in units]
        else:
            gen = torch.Generator().manual_seed(seed)
            scores = [torch.rand(u.shape, generator=gen, dtype=torch.float64)
                      * (0.01 if k in ("emb", "mlp") else 100) for u, k in zip(units, gates.kinds())]
        self.scores = gates.nest(scores)
        self.criterion = CRITERIA_BY_NAME["hessian"]
        if low_kind is not None:
            target = self.scores["emb"][0] if low_kind == "emb" else \
                self.scores["blocks"][low_block][low_kind]
            target[list(low_units)] = 0.0
        self.gates = gates

    def step(self, model=None):
        live = self.gates.nest(self.gates.unit_live())
        mask = lambda s, a: torch.where(a, s, torch.zeros_like(s))  # noqa: E731
        return {"emb": [mask(s, a) for s, a in zip(self.scores["emb"], live["emb"])],
                "blocks": [{k: mask(b[k], a[k]) for k in b}
                           for b, a in zip(self.scores["blocks"], live["blocks"])]}


def test_pace_is_prune_per_iter_over_group_size_groups_a_step():
    """--prune_per_iter 32 with the reference's --group_size 16: 1 group at the first step
    (the reference's index -1 is clamped to 0), 1 at the second, then 2 a step, whatever
    their kind; a group is always a whole group of its kind."""
    model, gates, saliency, pruner = setup(target=0.01, per_iter=32)
    pruner.saliency = FixedScores(gates, seed=5)
    removed, kinds = [], set()
    for _ in range(6):
        result = pruner.step(model)
        removed.append(sum(result.removed.values()))
        kinds |= {k for k, n in result.removed.items() if n}
        assert all(len(units) == GROUPS[kind] for kind, _, units in result.removed_units)
    assert removed == [1, 1, 2, 2, 2, 2]
    assert kinds == {"emb", "mlp"}  # groups of different kinds compete in one ranking


def test_prune_dict_budget_caps_steps_and_groups():
    """{"Global": N}: at most N // prune_per_iter + 1 prune steps, N // 16 groups."""
    model, gates, saliency, pruner = setup(target=0.0, per_iter=32, budget=100)
    pruner.saliency = FixedScores(gates, seed=6)
    results = [pruner.step(model) for _ in range(4)]
    assert [r.budget_spent for r in results] == [False, False, False, True]
    assert sum(sum(r.removed.values()) for r in results) == 6 <= 100 // 16
    assert not any(r.reached for r in results)  # target 0: no target


def test_step_stops_after_the_step_that_crosses_the_target():
    model, gates, saliency, pruner = setup(target=0.8, per_iter=32)
    pruner.saliency = FixedScores(gates, seed=7)
    ratios = []
    while True:
        result = pruner.step(model)
        ratios.append(result.ratio)
        if result.reached:
            break
        assert len(ratios) < 50
    assert ratios[-1] <= 0.8 and all(r > 0.8 for r in ratios[:-1])


@pytest.mark.parametrize("kind,block,units", [("mlp", 1, list(range(40, 56))),
                                              ("emb", 0, list(range(3, 19))),
                                              ("head", 2, [0, 3]),
                                              ("qk", 2, [1, 4, 6, 9, 11, 12, 20, 23])])
def test_lowest_saliency_group_goes_first(kind, block, units):
    model, gates, saliency, pruner = setup(target=0.1, per_iter=1)
    pruner.saliency = FixedScores(gates, kind, block, units)
    result = pruner.step(model)
    assert len(result.removed_units) == 1
    got_kind, got_block, got_units = result.removed_units[0]
    assert (got_kind, got_block) == (kind, block)
    if kind == "qk":  # the shared index is removed from every head of the block
        assert sorted(got_units) == sorted((h, d) for h in range(4) for d in units)
    else:
        assert sorted(got_units) == units


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
    fixed.criterion = saliency.criterion if additive else CRITERIA_BY_NAME["magnitude"]
    pruner.saliency = fixed
    result = pruner.step(model)
    assert result.removed_units[0][0] == first


def test_latency_penalty_prefers_costly_groups():
    """With a large lambda the cost drop dominates: the first removal is the group with the
    largest cost drop, whatever its saliency; with lambda 0 the cheapest saliency wins."""
    picks = {}
    for lam in (0.0, 1e9):
        model, gates, saliency, pruner = setup(target=0.1, per_iter=1, lam=lam, cost_cls=ParamsCost)
        backward(model, gates, saliency)
        result = pruner.step(model)
        picks[lam] = result.removed_units[0][:2]
    # the largest parameter drop of one group in DIMS is an embedding group (16 channels
    # through every block)
    assert picks[1e9] == ("emb", 0)


class MlpHeavyCost(MacsCost):
    """A ranking cost that only sees MLP width: with a large lambda the pruner must take
    MLP groups first, whatever MACs say."""

    name = "macs"

    def block(self, embed_dim, num_heads, qk_dim, v_dim, mlp_dim):
        return 1e9 * mlp_dim


def test_rank_cost_ranks_and_stop_cost_stops():
    model, gates, saliency, pruner = setup(target=0.8, per_iter=64, lam=1e6,
                                           rank_cost_cls=MlpHeavyCost)
    backward(model, gates, saliency)
    scores = saliency.step(model)
    cands = pruner.candidates(scores)
    drops = {(c.kind, c.block): c.cost_drop for c in cands}
    assert drops[("mlp", 0)] == pytest.approx(16.0)  # 16 neurons x 1e9 MACs, in GMACs
    assert drops[("head", 1)] == 0.0 and drops[("emb", 0)] < 1e-3  # emb: the stem only
    pruner.saliency = None  # the scores given are used: no second saliency (EMA) step
    kinds = set()
    for _ in range(3):  # 1 + 3 + 4 groups, fewer than the MLP layers can give
        result = pruner.step(model, scores)
        kinds |= {k for k, _, _ in result.removed_units}
    assert kinds == {"mlp"} and sum(gates.widths()["mlp_dim"]) == 288 - 8 * 16
    # the stop rule still uses the pruner's own cost (real MACs), not the ranking cost
    macs = MacsCost(model.dims)
    assert result.ratio == pytest.approx(macs.total(compact(model).dims) / macs.total(model.dims))
    assert result.reached == (result.ratio <= 0.8)


def test_target_validation():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="target"):
            setup(target=bad)
    setup(target=0.0)  # no target: prune until the budget


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


# ------------------------------------------------------------------------ the loop object
def _loop_parts(student_eval=False, interval=3, iters_per_epoch=5, **loop_kw):
    from types import SimpleNamespace
    from pruning.loop import PruningLoop
    model, gates, saliency, pruner = setup(target=0.0, per_iter=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = SimpleNamespace(kl_enabled=None)
    times = iter(range(0, 10_000, 60))  # a clock that advances a minute per reading
    records = []
    loop = PruningLoop(model, gates, saliency, pruner, criterion, optimizer, interval=interval,
                       iters_per_epoch=iters_per_epoch, student_eval=student_eval,
                       on_prune=records.append, clock=lambda: float(next(times)), **loop_kw)
    return model, loop, optimizer, records


def _drive(model, loop, optimizer, epoch, steps, start=0):
    import engine
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))) for _ in range(steps)]
    loop.set_phase()

    def criterion(x, out, y):
        return sum(torch.nn.functional.cross_entropy(o, y) for o in out)
    return engine.train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), epoch,
                                  print_freq=1000, start_iter=start, **loop.hooks(epoch))


def test_loop_prunes_after_every_interval_and_switches_phase():
    """Prune steps in the iteration after iterations 3, 6, 9 (global, across epochs); the KL
    term and eval mode (with student_eval) start at the first; the history and position
    follow; the optimizer state of removed weights is cleared."""
    model, loop, optimizer, records = _loop_parts(student_eval=True)
    _drive(model, loop, optimizer, 0, 5)
    assert [r["iteration"] for r in records] == [4] and loop.pruner.steps == 1
    assert loop.criterion.kl_enabled is True and not model.training and model.return_pair
    assert (loop.epoch, loop.iteration) == (1, 0)
    _drive(model, loop, optimizer, 1, 5)
    assert [(r["epoch"], r["iteration"]) for r in records] == [(0, 4), (1, 2), (1, 5)]
    assert [r["step"] for r in loop.history] == [1, 2, 3]
    removed = [k for k, n in records[-1]["removed_groups"].items() if n]
    assert removed and "loss" in records[-1]


def test_loop_state_round_trip_and_save_cadence():
    model, loop, optimizer, _ = _loop_parts(save_every_steps=2)
    _drive(model, loop, optimizer, 0, 5)
    assert loop.pruner.steps == 1 and not loop.save_due()
    _drive(model, loop, optimizer, 1, 3)
    assert loop.pruner.steps == 2 and loop.save_due()
    loop.mark_saved()
    assert not loop.save_due()
    state = loop.state_dict()
    model2, other, _, _ = _loop_parts()
    other.load_state_dict(state)
    assert other.pruner.steps == 2 and (other.epoch, other.iteration) == (1, 3)
    assert other.gates.widths() == loop.gates.widths() and other.history == loop.history
    # minutes: due once the clock has moved on and a prune step happened since
    _, timed, opt3, _ = _loop_parts(save_every_seconds=90)
    _drive(timed.model, timed, opt3, 0, 5)
    assert timed.save_due()
    timed.stop_requested = True
    assert timed.save_due()


def test_engine_step_update_sets_each_steps_learning_rate():
    """engine.train_one_epoch's step_update(i) runs before step i's optimizer step (the quality
    study's per-step schedule rides on it)."""
    import engine
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen, plain_step = [], opt.step

    def step(*a, **k):
        seen.append(opt.param_groups[0]["lr"])
        return plain_step(*a, **k)
    opt.step = step

    def update(i: int) -> None:
        opt.param_groups[0]["lr"] = 0.1 * (i + 1)
    batches = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)]
    engine.train_one_epoch(model, lambda x, out, y: ((out - y) ** 2).mean(), batches, opt,
                           torch.device("cpu"), 0, print_freq=1000, step_update=update)
    assert seen == pytest.approx([0.1, 0.2, 0.3])


# ------------------------------------------------------------------ ranks resynchronised
def _prune_with_drift(rank: int, folder: str) -> None:
    """One prune step on two gloo ranks whose scores drifted: rank 0 removes embedding
    channels, rank 1 (on its own) MLP neurons of block 0. Rank 0's masks are broadcast; what
    each rank then holds is written to folder/rank{rank}.pt."""
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        model, gates, saliency, pruner = setup(target=0.0, per_iter=32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(1)  # the same batch on both ranks: equal weights and moments
        x = torch.randn(4, 3, 32, 32)
        out = model(x)  # also fills rank 1's cache of live embedding channels
        (out[0].sum() + out[1].sum()).backward()
        opt.step()
        saliency.accumulate()
        scores = saliency.step(model)
        low, high = 1e-12, 1e12
        scores["emb"] = [torch.full_like(scores["emb"][0], low if rank == 0 else high)]
        scores["blocks"][0]["mlp"] = torch.full_like(scores["blocks"][0]["mlp"],
                                                     high if rank == 0 else low)
        result = pruner.step(model, scores)
        clear_pruned_state(opt, model, result.removed_units)
        model.zero_grad()
        model.eval()
        y = model(x)
        y.sum().backward()
        opt.step()  # with moments cleared unlike rank 0's, the weights would now differ
        import utils
        torch.save({"removed": result.removed_units, "logits": y.detach(),
                    "emb_live": int((gates.embs[0] != 0).sum()),
                    "mlp_live": int((gates.blocks[0]["mlp"] != 0).sum()),
                    "moments": {n: opt.state[p]["exp_avg"].clone()
                                for n, p in model.named_parameters()},
                    "identical": utils.replicas_identical(model)}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rank_0s_masks_resynchronise_every_rank(tmp_path):
    """Ranks whose own prune decisions drifted end the step as rank 0 left it: the same masks,
    the same function (rank 1's cached live embedding channels recomputed although its own
    step never touched that gate), the optimizer moments cleared for rank 0's removed units,
    and after another optimizer step the same weights, which the end-of-run check compares."""
    torch.multiprocessing.spawn(_prune_with_drift, args=(str(tmp_path),), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["emb_live"] == r1["emb_live"] < DIMS.embed_dim  # rank 0 removed channels
    assert r0["mlp_live"] == r1["mlp_live"] == DIMS.mlp_dim[0]  # and no MLP neurons
    assert r0["removed"] == r1["removed"] and {k for k, _, _ in r0["removed"]} == {"emb"}
    assert torch.equal(r0["logits"], r1["logits"])
    for name, m in r0["moments"].items():
        assert torch.equal(m, r1["moments"][name]), name
    assert r0["identical"] and r1["identical"]


def _stop_on_rank_1(rank: int, folder: str) -> None:
    """Two gloo ranks drive a PruningLoop with a long prune interval; rank 1 alone is asked
    to stop (SIGTERM's handler sets the flag) during step 2 of a 10-step epoch."""
    import datetime
    import torch.distributed as dist
    import engine
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        model, loop, optimizer, records = _loop_parts(interval=100, iters_per_epoch=10)
        batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))) for _ in range(10)]
        hooks = loop.hooks(0)
        after_step = hooks["after_step"]

        def ask_on_rank_1(i, losses):
            if rank == 1 and i == 2:
                loop.stop_requested = True  # what nvit_prune.py's SIGTERM handler does
            return after_step(i, losses)
        hooks["after_step"] = ask_on_rank_1

        def criterion(x, out, y):
            return sum(torch.nn.functional.cross_entropy(o, y) for o in out)
        engine.train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), 0,
                               print_freq=1000, **hooks)
        agreed = loop.stop_agreed()
        torch.save({"iteration": loop.iteration, "agreed": agreed}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_next_step(tmp_path):
    """A SIGTERM's stop request rides on the per-step all-reduce: every rank stops after the
    next step, mid-interval, rather than at the next prune step (100 steps on) or the epoch's
    end, which torchrun's and SLURM's SIGKILL 30 s later could pre-empt."""
    torch.multiprocessing.spawn(_stop_on_rank_1, args=(str(tmp_path),), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0 == r1 == {"iteration": 4, "agreed": True}  # asked in step 2, stopped after 3
