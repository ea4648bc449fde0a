"""The one tree walker (named tuples, non-tensor leaves), leaf replacement by path, modes on DEQ states, keys."""

from collections import namedtuple

import pytest
import torch

import pylux as lx
import pylux.core as core
from pylux import nn
from pylux.core import TreeStructureError

F64 = torch.float64
Pair = namedtuple("Pair", "left right")


def _tree():
    return {"a": torch.tensor([1.0, 2.0]), "flags": {"training": True, "name": "x", "none": None},
            "pair": Pair(torch.tensor(3.0), [torch.tensor(4.0), 5]), "seq": (torch.tensor(6.0),)}


def test_tree_map_rebuilds_named_tuples_field_by_field_and_passes_other_leaves_through():
    out = core.tree_map(lambda t: 10 * t, _tree())
    assert type(out["pair"]) is Pair and torch.equal(out["pair"].left, torch.tensor(30.0))
    assert torch.equal(out["pair"].right[0], torch.tensor(40.0)) and out["pair"].right[1] == 5
    assert out["flags"] == {"training": True, "name": "x", "none": None}
    assert type(out["seq"]) is tuple and torch.equal(out["seq"][0], torch.tensor(60.0))
    summed = core.tree_map(lambda a, b: a + b, _tree(), out)
    assert torch.equal(summed["a"], torch.tensor([11.0, 22.0]))
    with pytest.raises(TreeStructureError, match="key 'pair' is missing"):
        core.tree_map(lambda a, b: a + b, _tree(), {"a": torch.zeros(2), "flags": {}})


def test_tree_map_with_path_sees_every_leaf_with_its_path():
    seen = []
    core.tree_map_with_path(lambda path, leaf: seen.append((path, leaf)) or leaf, _tree())
    paths = [p for p, _ in seen]
    assert paths == [("a",), ("flags", "training"), ("flags", "name"), ("flags", "none"), ("pair", 0),
                     ("pair", 1, 0), ("pair", 1, 1), ("seq", 0)]
    assert [p for p, _ in core.tree_leaves_with_path(_tree())] == [("a",), ("pair", 0), ("pair", 1, 0), ("seq", 0)]


def test_tree_replace_at_paths_replaces_leaves_and_subtrees_inside_named_tuples():
    tree = _tree()
    new = core.tree_replace_at_paths(tree, [("pair", 1, 0), ("flags",)], [torch.tensor(-4.0), {"training": False}])
    assert type(new["pair"]) is Pair and torch.equal(new["pair"].right[0], torch.tensor(-4.0))
    assert new["pair"].left is tree["pair"].left and new["a"] is tree["a"]  # leaves are shared
    assert new["flags"] == {"training": False}
    assert torch.equal(tree["pair"].right[0], torch.tensor(4.0)) and tree["flags"]["training"] is True
    with pytest.raises(TreeStructureError, match="no node at path 'pair.7'"):
        core.tree_replace_at_paths(tree, [("pair", 7)], [torch.zeros(())])
    with pytest.raises(ValueError, match="2 paths but 1 new leaves"):
        core.tree_replace_at_paths(tree, [("a",), ("seq", 0)], [torch.zeros(())])


def _cell(d):
    return nn.Chain(nn.Parallel("+", nn.Dense(d, d), nn.NoOpLayer()), nn.WrappedFunction(torch.tanh))


def test_testmode_and_trainmode_keep_a_deq_solution_in_the_state():
    model = nn.Chain(nn.Dense(3, 4, torch.tanh), lx.DEQ(_cell(4), lx.Broyden(), jacobian_regularization=1.0),
                     nn.Dropout(0.1))
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=F64)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    _, st = model(x, ps, st)
    solution = st["layer_2"]["solution"]
    st_test = lx.testmode(st)  # crashed: the DEQSolution was rebuilt from a generator of its fields
    assert st_test["layer_3"]["training"] is False and st["layer_3"]["training"] is True
    rebuilt = st_test["layer_2"]["solution"]
    assert type(rebuilt) is lx.DEQSolution and rebuilt._fields == solution._fields
    for name, a, b in zip(solution._fields, rebuilt, solution):
        if name == "backward_stats":
            assert type(a) is dict and a == b  # a container: rebuilt, with the same entries
        else:
            assert a is b, name  # leaves passed through unchanged (tensors, ints, enums, None)
    assert float(rebuilt.residual.max()) < 1e-5 and rebuilt.nfe == solution.nfe > 0
    assert lx.trainmode(st_test)["layer_3"]["training"] is True
    assert type(lx.trainmode(st_test)["layer_2"]["solution"]) is lx.DEQSolution
    y_test, _ = model(x, ps, st_test)
    y_again, _ = model(x, ps, st_test)
    assert torch.equal(y_test, y_again)


def test_split_key_is_splitmix64_and_key_helpers_check_their_input():
    # The first output of SplitMix64 seeded with 0 (Steele, Lea & Flood 2014 reference value).
    seed, next_key = core.split_key(0)
    assert seed == 0xE220A8397B1DCDAF and next_key == 0x9E3779B97F4A7C15
    assert core.split_key(next_key)[0] == 0x6E789E6AA1B965F4
    generator, key = core.key_generator(0)
    assert key == next_key
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(seed)))
    for bad in (True, -1, 2 ** 64, 1.0, None):
        with pytest.raises(lx.LayerError, match="state 'rng' must be an int key"):
            core.check_key(bad)
    assert core.draw_key(torch.Generator().manual_seed(3)) == core.draw_key(torch.Generator().manual_seed(3))
    with pytest.raises(TypeError, match="expected a torch.Generator"):
        core.draw_key(3)
