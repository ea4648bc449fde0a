"""Core behaviours (setup, trees, flat vectors, modes, error paths) exercised through pylux.nn layers."""

import pytest
import torch

import pylux.core as core
from pylux import nn
from pylux.core import LayerError, TreeStructureError


def _model():
    return nn.Chain(nn.Dense(3, 4, torch.tanh), nn.Chain(nn.Dense(4, 5), nn.BatchNorm(5)), nn.Dropout(0.2),
                    nn.Dense(5, 2))


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


# --- setup and deterministic init -------------------------------------------------------------

def test_same_seed_gives_identical_parameters_and_state():
    ps1, st1 = core.setup(_rng(7), _model())
    ps2, st2 = core.setup(_rng(7), _model())
    leaves1, leaves2 = core.tree_leaves_with_path(ps1), core.tree_leaves_with_path(ps2)
    assert [p for p, _ in leaves1] == [p for p, _ in leaves2]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(leaves1, leaves2))
    assert st1["layer_3"]["rng"] == st2["layer_3"]["rng"]


def test_different_seed_gives_different_parameters():
    ps1, st1 = core.setup(_rng(0), _model())
    ps2, st2 = core.setup(_rng(1), _model())
    assert not torch.equal(ps1["layer_1"]["weight"], ps2["layer_1"]["weight"])
    assert st1["layer_3"]["rng"] != st2["layer_3"]["rng"]


def test_setup_draws_sequentially_from_one_generator():
    # Two identical Dense layers in a chain must not get identical weights.
    ps, _ = core.setup(_rng(0), nn.Chain(nn.Dense(4, 4), nn.Dense(4, 4)))
    assert not torch.equal(ps["layer_1"]["weight"], ps["layer_2"]["weight"])


def test_setup_rejects_a_non_generator():
    with pytest.raises(TypeError, match="expected a torch.Generator.*got int"):
        core.setup(0, nn.Dense(2, 3))
    with pytest.raises(TypeError, match="expected a pylux layer, got Linear"):
        core.setup(_rng(), torch.nn.Linear(2, 3))


def test_setup_dtype_casts_floats_and_keeps_the_dropout_key():
    ps, st = core.setup(_rng(), _model(), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in core.tree_leaves(ps))
    assert st["layer_2"]["layer_2"]["running_var"].dtype == torch.float64
    assert isinstance(st["layer_3"]["rng"], int)


def test_parameter_count_of_layer_equals_count_of_tree():
    model = _model()
    ps, _ = core.setup(_rng(), model)
    expected = (3 * 4 + 4) + (4 * 5 + 5) + 2 * 5 + (5 * 2 + 2)
    assert core.parameter_count(ps) == expected == core.parameter_count(model) == model.parameter_count()
    assert core.state_count(model) == 10


def test_apply_equals_call():
    model = _model()
    ps, st = core.setup(_rng(), model)
    x = torch.randn(6, 3, generator=_rng(1))
    y1, _ = core.apply(model, x, ps, st)
    y2, _ = model(x, ps, st)
    assert torch.equal(y1, y2)


# --- modes ------------------------------------------------------------------------------------

def test_trainmode_testmode_flip_every_nested_flag_without_touching_the_original():
    _, st = core.setup(_rng(), _model())
    flags = lambda s: [s["layer_2"]["layer_2"]["training"], s["layer_3"]["training"]]  # noqa: E731
    assert flags(st) == [True, True]
    st_test = core.testmode(st)
    assert flags(st_test) == [False, False]
    assert flags(st) == [True, True]
    assert flags(core.trainmode(st_test)) == [True, True]
    assert torch.equal(st_test["layer_2"]["layer_2"]["running_mean"], st["layer_2"]["layer_2"]["running_mean"])


def test_testmode_makes_a_model_with_dropout_and_batchnorm_deterministic():
    model = _model()
    ps, st = core.setup(_rng(), model)
    st = core.testmode(st)
    x = torch.randn(6, 3, generator=_rng(1))
    y1, st1 = model(x, ps, st)
    y2, _ = model(x, ps, st1)
    assert torch.equal(y1, y2)


# --- parameter trees with the wrong keys ------------------------------------------------------

def test_chain_parameter_tree_missing_a_child_names_it():
    model = _model()
    ps, st = core.setup(_rng(), model)
    del ps["layer_2"]
    with pytest.raises(LayerError, match=r"^Chain: parameter tree is missing key 'layer_2'"):
        model(torch.randn(2, 3), ps, st)


def test_chain_parameter_tree_with_extra_child_names_it():
    model = _model()
    ps, st = core.setup(_rng(), model)
    ps["layer_9"] = {}
    with pytest.raises(LayerError, match="unexpected extra key 'layer_9'"):
        model(torch.randn(2, 3), ps, st)


def test_leaf_parameter_tree_missing_or_extra_key_names_it_with_its_path():
    model = _model()
    ps, st = core.setup(_rng(), model)
    del ps["layer_2"]["layer_1"]["bias"]
    with pytest.raises(LayerError) as info:
        model(torch.randn(2, 3), ps, st)
    assert str(info.value) == ("Chain.layer_2 (Chain).layer_1 (Dense): parameter tree is missing key 'bias' "
                               "(expected keys ['weight', 'bias'])")
    ps, st = core.setup(_rng(), model)
    ps["layer_4"]["gamma"] = torch.zeros(2)
    with pytest.raises(LayerError, match=r"^Chain.layer_4 \(Dense\): parameter tree has unexpected extra key 'gamma'"):
        model(torch.randn(2, 3), ps, st)


def test_state_tree_missing_key_names_it():
    model = _model()
    ps, st = core.setup(_rng(), model)
    del st["layer_2"]["layer_2"]["running_var"]
    with pytest.raises(LayerError, match=r"layer_2 \(BatchNorm\): state tree is missing key 'running_var'"):
        model(torch.randn(4, 3), ps, st)


def test_tree_check_structure_names_missing_extra_and_shape():
    ref, _ = core.setup(_rng(), _model())
    cand, _ = core.setup(_rng(), _model())
    del cand["layer_4"]["bias"]
    with pytest.raises(TreeStructureError, match="ps: missing key 'layer_4.bias'"):
        core.tree_check_structure(ref, cand, "ps")
    cand, _ = core.setup(_rng(), _model())
    cand["layer_1"]["scale"] = torch.ones(1)
    with pytest.raises(TreeStructureError, match="unexpected extra key 'layer_1.scale'"):
        core.tree_check_structure(ref, cand, "ps")
    cand, _ = core.setup(_rng(), _model())
    cand["layer_1"]["weight"] = torch.ones(3, 4)
    with pytest.raises(TreeStructureError,
                       match=r"shape mismatch at 'layer_1.weight': expected \(4, 3\), got \(3, 4\)"):
        core.tree_check_structure(ref, cand, "ps")


def test_wrong_parameter_shape_is_named():
    layer = nn.Dense(3, 4)
    ps, st = core.setup(_rng(), layer)
    ps["weight"] = ps["weight"].T
    with pytest.raises(LayerError, match=r"parameter 'weight' has shape \(3, 4\), expected \(4, 3\)"):
        layer(torch.randn(2, 3), ps, st)


# --- dtype / device mismatch ------------------------------------------------------------------

def test_dtype_mismatch_between_input_and_parameters_names_both():
    model = _model()
    ps, st = core.setup(_rng(), model)
    with pytest.raises(LayerError) as info:
        model(torch.randn(2, 3, dtype=torch.float64), ps, st)
    message = str(info.value)
    assert message.startswith("Chain.layer_1 (Dense): input dtype torch.float64 does not match parameter 'weight' "
                              "dtype torch.float32")
    assert "setup(rng, model, dtype=torch.float64)" in message


def test_device_mismatch_names_both_devices():
    layer = nn.Dense(3, 4)
    ps, st = core.setup(_rng(), layer)
    with pytest.raises(LayerError, match="input is on device meta but parameter 'weight' is on cpu"):
        layer(torch.empty(2, 3, device="meta"), ps, st)


# --- nested error paths -----------------------------------------------------------------------

def test_nested_chain_error_path():
    inner = nn.Chain(nn.Dense(4, 64), nn.Dense(64, 2))
    model = nn.Chain(nn.Dense(3, 4), inner)
    ps, st = core.setup(_rng(), model)
    ps["layer_2"]["layer_2"] = core.setup(_rng(), nn.Dense(32, 2))[0]
    with pytest.raises(LayerError, match=r"^Chain.layer_2 \(Chain\).layer_2 \(Dense\): parameter 'weight' has shape"):
        model(torch.randn(5, 3), ps, st)
    flat = nn.Chain(nn.Dense(3, 4), nn.Dense(64, 2))
    ps, st = core.setup(_rng(), flat)
    with pytest.raises(LayerError) as info:
        flat(torch.randn(5, 3), ps, st)
    assert str(info.value) == ("Chain.layer_2 (Dense): expected input with last dimension 64, got 4 "
                               "(input shape (5, 4), expected (..., 64))")
    assert info.value.path == ("Chain", "layer_2 (Dense)")


# --- flat parameter vectors -------------------------------------------------------------------

def test_flatten_unflatten_round_trip():
    ps, _ = core.setup(_rng(), _model(), dtype=torch.float64)
    vector, unflatten = core.flatten(ps)
    assert vector.shape == (core.parameter_count(ps),) and len(unflatten) == vector.numel()
    back = unflatten(vector)
    for (p1, a), (p2, b) in zip(core.tree_leaves_with_path(ps), core.tree_leaves_with_path(back)):
        assert p1 == p2 and torch.equal(a, b)
    # Depth-first order: the first 12 entries are layer_1.weight (4 x 3) row-major.
    assert torch.equal(vector[:12], ps["layer_1"]["weight"].reshape(-1))


def test_flatten_of_unflattened_tree_is_zero_copy_in_both_directions():
    ps, _ = core.setup(_rng(), _model())
    vector, unflatten = core.flatten(ps)
    tree = unflatten(vector)
    again, _ = core.flatten(tree)
    assert again.data_ptr() == vector.data_ptr() and again.numel() == vector.numel()
    # Write through the vector, read through the tree ...
    vector[0] = 123.0
    assert tree["layer_1"]["weight"][0, 0] == 123.0
    # ... and write through the tree, read through the vector.
    tree["layer_4"]["bias"][1] = -7.0
    assert vector[-1] == -7.0
    assert again[-1] == -7.0


def test_model_runs_on_unflattened_views_and_gradient_reaches_the_vector():
    model = _model()
    ps, st = core.setup(_rng(), model, dtype=torch.float64)
    vector, unflatten = core.flatten(ps)
    vector = vector.clone().requires_grad_(True)
    x = torch.randn(6, 3, dtype=torch.float64, generator=_rng(2))
    y, _ = model(x, unflatten(vector), core.testmode(st))
    y.sum().backward()
    assert vector.grad is not None and vector.grad.shape == vector.shape
    # The last two entries are layer_4.bias: d(sum y)/db = batch size.
    assert torch.equal(vector.grad[-2:], torch.full((2,), 6.0, dtype=torch.float64))


def test_flatten_rejects_mixed_dtypes_and_unflatten_wrong_length():
    ps = {"a": torch.zeros(2), "b": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(TypeError, match="'a' is torch.float32 on cpu but 'b' is torch.float64"):
        core.flatten(ps)
    _, unflatten = core.flatten({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="expected a 1-D vector of length 2, got shape \\(3,\\)"):
        unflatten(torch.zeros(3))


def test_tree_map_and_global_norm_on_a_model_tree():
    ps, _ = core.setup(_rng(), _model(), dtype=torch.float64)
    doubled = core.tree_map(lambda p: 2 * p, ps)
    vector, _ = core.flatten(ps)
    assert torch.allclose(core.tree_global_norm(doubled), 2 * torch.linalg.vector_norm(vector))
    zeros = core.tree_zeros_like(ps)
    assert core.tree_global_norm(zeros) == 0.0


def test_option_value_checkers_name_the_caller_the_option_and_what_is_allowed():
    import importlib.util

    from pylux.core.validation import check_bool, check_choice, check_float, check_int
    assert importlib.util.find_spec("pylux.nonlinear._options") is None  # one home: pylux.core.validation
    assert check_int("f", "n", 3, 1) == 3 and check_int("f", "n", None, 1, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^f: n must be an int, got bool True\.$"):
        check_int("f", "n", True, 0)
    with pytest.raises(TypeError, match=r"^f: n must be an int, got float 3\.0\.$"):
        check_int("f", "n", 3.0, 0)
    with pytest.raises(ValueError, match=r"^f: n must be >= 1, got 0\.$"):
        check_int("f", "n", 0, 1)
    assert check_float("f", "tol", 1, low=0.0) == 1.0 and type(check_float("f", "tol", 1)) is float
    with pytest.raises(ValueError, match=r"^f: tol must lie in \(0, inf\), got 0\.0\.$"):
        check_float("f", "tol", 0.0, low=0.0, low_open=True, high_open=True)
    with pytest.raises(ValueError, match=r"must lie in \[-inf, inf\], got nan"):
        check_float("f", "tol", float("nan"))
    with pytest.raises(TypeError, match=r"^f: tol must be a real number, got str '1'\.$"):
        check_float("f", "tol", "1")
    assert check_bool("f", "flag", False) is False
    with pytest.raises(TypeError, match=r"^f: flag must be True or False, got int 1\.$"):
        check_bool("f", "flag", 1)
    assert check_choice("f", "mode", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match=r"^f: mode must be one of 'a', 'b', got 'c'\.$"):
        check_choice("f", "mode", "c", ("a", "b"))
