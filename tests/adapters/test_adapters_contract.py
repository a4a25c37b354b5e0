"""The adapter contract, for every adapter: isolation, sharing, state, determinism, split."""
import copy
import io

import pytest
import torch

import adapters
from adapter_models import stream, tiny_cnn

ALL = adapters.available()
BN_ONLY = ["source", "bn", "bn-alpha", "bn-ema", "unmix-tns"]


def make(name, model, **hp):
    if name == "mean-teacher" and "prototypes" not in hp:
        hp["prototypes"] = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    if name in ("cotta", "mean-teacher"):
        hp.setdefault("n_augmentations", 4) if name == "cotta" else None
    if name == "rotta":  # updates within the tests' short streams (default: every 64 samples)
        hp.setdefault("update_frequency", 4)
    if name == "deyo":  # tiny_cnn's near-uniform predictions pass DeYO's filters only when opened
        hp.setdefault("margin", 1.0)
        hp.setdefault("plpd", -1.0)
    if name in ("sar", "eata"):  # tiny_cnn's near-uniform predictions are all unreliable at 0.4·ln 10
        hp.setdefault("margin_e0", 1.0)
    return adapters.create(name, model, **hp)


def run(adapter, batches):
    return [adapter.step(x) for x in batches]


def test_available_lists_the_methods():
    assert ALL == ["source", "bn", "bn-alpha", "bn-ema", "unmix-tns", "tent", "mean-teacher", "cotta",
                   "lame", "sar", "eata", "rotta", "deyo"]


@pytest.mark.parametrize("name", ALL)
def test_describe_lists_every_hyperparameter(name):
    d = adapters.describe(name)
    assert d["name"] == name and d["summary"]
    for h in d["hyperparameters"]:
        assert set(h) == {"name", "default", "range", "meaning"} and h["meaning"] and h["range"]


@pytest.mark.parametrize("name", ALL)
def test_create_never_mutates_the_model(name):
    model = tiny_cnn()
    before = copy.deepcopy(model.state_dict())
    flags = [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    a = make(name, model)
    run(a, stream(3))
    a.reset()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert flags == [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    assert grads == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ALL)
def test_two_adapters_on_one_model_evolve_independently(name):
    model = tiny_cnn()
    batches = stream(4)
    a, b = make(name, model), make(name, model)
    run(a, batches)  # a adapts on the whole stream first
    fresh = make(name, model)
    for x in batches:
        assert torch.equal(b.step(x), fresh.step(x))


@pytest.mark.parametrize("name", BN_ONLY)
def test_bn_only_adapters_share_the_source_weights(name):
    model = tiny_cnn()
    a = make(name, model)
    source_storage = {p.data_ptr() for p in model.parameters()}
    net_storage = {p.data_ptr() for p in a.net.parameters()}
    assert net_storage == source_storage  # no weight was copied
    assert all(not k.endswith(("weight", "bias")) for k in a.state_dict()["state"])


@pytest.mark.parametrize("name", ["tent"])
def test_tent_owns_only_the_affine_parameters(name):
    model = tiny_cnn()
    a = make(name, model)
    shared = {p.data_ptr() for p in model.parameters()}
    own = [n for n, p in a.net.named_parameters() if p.data_ptr() not in shared]
    assert sorted(own) == ["1.bias", "1.weight", "4.bias", "4.weight"]


@pytest.mark.parametrize("name", ALL)
def test_predict_then_learn_equals_step(name):
    model = tiny_cnn()
    batches = stream(4)
    a, b = make(name, model), make(name, model)
    for x in batches:
        expected = a.step(x)
        got = b.predict(x)
        b.learn()
        assert torch.equal(expected, got)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_resumes_bit_identically(name):
    model = tiny_cnn()
    batches = stream(6)
    a = make(name, model)
    run(a, batches[:3])
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = make(name, model, seed=123) if a.uses_randomness else make(name, model)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    assert b.steps == a.steps
    for x in batches[3:]:
        assert torch.equal(a.step(x), b.step(x))


@pytest.mark.parametrize("name", ALL)
def test_reset_returns_to_the_source_state(name):
    model = tiny_cnn()
    batches = stream(3)
    a = make(name, model)
    first = run(a, batches)
    a.reset()
    assert a.steps == 0
    again = run(a, batches)
    for x, y in zip(first, again):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ALL)
def test_works_when_the_caller_holds_no_grad(name):
    model = tiny_cnn()
    batches = stream(2)
    a, b = make(name, model), make(name, model)
    expected = run(a, batches)
    with torch.no_grad():
        got = run(b, batches)
    for x, y in zip(expected, got):
        assert torch.equal(x, y)
    if a.updates_weights:
        assert b.weight_distance() > 0


@pytest.mark.parametrize("name", ALL)
def test_seed_controls_the_randomness(name):
    model = tiny_cnn()
    batches = stream(3)
    same = [run(make(name, model, **({"seed": 5} if adapters.REGISTRY[name].uses_randomness else {})), batches)
            for _ in range(2)]
    for x, y in zip(*same):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["bn-alpha", "unmix-tns", "bn", "bn-ema", "source"])
def test_batch_size_one(name):
    model = tiny_cnn()
    a = make(name, model)
    for x in stream(3, batch=1):
        out = a.step(x)
        assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_unmix_tns_prediction_does_not_depend_on_batch_composition():
    model = tiny_cnn()
    x = stream(1, batch=6)[0]
    whole = make("unmix-tns", model).predict(x)
    alone = make("unmix-tns", model).predict(x[:1])
    assert torch.allclose(whole[:1], alone, atol=1e-6)


@pytest.mark.parametrize("name,bad,message", [
    ("bn-alpha", {"alpha": 1.5}, "alpha"),
    ("bn-alpha", {"alpah": 0.1}, "alpah"),
    ("cotta", {"lr": -1}, "lr"),
    ("cotta", {"threshold": "abc"}, "threshold"),
    ("cotta", {"norm": "layer"}, "norm"),
    ("unmix-tns", {"k": 0}, "k"),
    ("tent", {"steps": 0}, "steps"),
    ("mean-teacher", {"prototypes": [1, 2]}, "prototypes"),
    ("source", {"lr": 1e-3}, "lr"),
])
def test_invalid_hyperparameters_are_refused_by_name(name, bad, message):
    with pytest.raises(ValueError) as error:
        adapters.create(name, tiny_cnn(), **bad)
    assert repr(message) in str(error.value) or message in str(error.value)
    if "range" in str(error.value):
        assert "valid range" in str(error.value)


def test_unknown_adapter_names_the_choices():
    with pytest.raises(ValueError, match="available: source, bn"):
        adapters.create("tnet", tiny_cnn())


def test_coerce_parses_wire_strings():
    assert adapters.coerce("cotta", {"lr": "0.01", "n_augmentations": "8", "betas": "0.8,0.99"}) == \
        {"lr": 0.01, "n_augmentations": 8, "betas": (0.8, 0.99)}
    assert adapters.coerce("cotta", {"norm": "unmix-tns", "norm_options": '{"k": 4}'})["norm_options"] == {"k": 4}
    with pytest.raises(ValueError, match="'n_augmentations'"):
        adapters.coerce("cotta", {"n_augmentations": "1.5"})


@pytest.mark.parametrize("name", ["cotta", "tent", "mean-teacher"])
def test_composition_under_unmix_tns(name):
    from adapters.unmix_tns import UnMixTNS2d

    model = tiny_cnn()
    a = make(name, model, norm="unmix-tns", norm_options={"k": 4})
    net = a.student if hasattr(a, "student") else a.net
    assert sum(isinstance(m, UnMixTNS2d) for m in net.modules()) == 2
    before = net.get_submodule("1").component_means.clone()
    outs = run(a, stream(2))
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(before, net.get_submodule("1").component_means)  # components moved
    if name == "cotta":  # the teacher keeps its own components
        assert net.get_submodule("1").component_means.data_ptr() != \
            a.teacher.get_submodule("1").component_means.data_ptr()


def test_observe_bn_inputs_reports_each_layer_once_per_batch():
    model = tiny_cnn()
    for name in ALL:
        a = make(name, model)
        seen = []
        handle = a.observe_bn_inputs(lambda layer, x, mean, var: seen.append((layer, x.shape[1], mean.shape[0])))
        a.step(stream(1)[0])
        assert seen == [("1", 8, 8), ("4", 16, 16)], name
        handle.remove()
        a.step(stream(1)[0])
        assert len(seen) == 2


def test_state_bytes_counts_per_stream_state_only():
    model = tiny_cnn()
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert make("source", model).state_bytes() == 0
    assert make("bn", model).state_bytes() == 0
    assert 0 < make("bn-ema", model).state_bytes() < weights
    cotta = make("cotta", model)
    before = cotta.state_bytes()
    assert 4 * weights <= before < 5 * weights  # student, teacher and Adam's two moments (+ BN counters)
    cotta.step(stream(1)[0])
    assert cotta.state_bytes() == before  # the moments were counted before Adam allocated them
    assert abs(before - sum(v.numel() * v.element_size() for v in _tensors(cotta.state_dict()["state"]))) < 64


def test_torchscript_models_are_refused():
    scripted = torch.jit.script(tiny_cnn())
    with pytest.raises(ValueError, match="TorchScript"):
        adapters.create("bn", scripted)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
