"""from_keras / to_keras against Keras 3 itself (torch backend): outputs, final states, weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import rnnkit
from rnnkit import keras_interop

# Keras reads its backend once, at its first import; torch is the one every rnnkit install has.
os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")

# Keras 3's torch backend calls np.array on torch tensors, which numpy 2 warns about; not rnnkit's.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

BATCH, STEPS, FEATURES, UNITS = 3, 6, 5, 4
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _random(shape, seed: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _uniform(seed: int):
    """Nonzero biases (Keras' default is zeros, which would leave every bias untested)."""
    return keras.initializers.RandomUniform(-0.5, 0.5, seed=seed)


def _recurrent(kind: str, seed: int, **options):
    options.setdefault("use_bias", True)
    if options["use_bias"]:
        options.setdefault("bias_initializer", _uniform(seed))
    return getattr(keras.layers, kind)(
        UNITS, return_sequences=True, return_state=True,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1),
        recurrent_initializer=keras.initializers.Orthogonal(seed=seed + 2), **options,
    )


KERAS_LAYERS = {
    "lstm": lambda: _recurrent("LSTM", 10),
    "lstm-no-bias": lambda: _recurrent("LSTM", 20, use_bias=False),
    "gru-reset-after": lambda: _recurrent("GRU", 30),
    "gru-reset-before": lambda: _recurrent("GRU", 40, reset_after=False),
    "gru-reset-after-no-bias": lambda: _recurrent("GRU", 50, use_bias=False),
    "gru-reset-before-no-bias": lambda: _recurrent("GRU", 60, reset_after=False, use_bias=False),
    "simple-rnn-relu": lambda: _recurrent("SimpleRNN", 70, activation="relu"),
    "bidirectional-lstm": lambda: keras.layers.Bidirectional(_recurrent("LSTM", 80)),
    "bidirectional-gru-reset-before": lambda: keras.layers.Bidirectional(
        _recurrent("GRU", 90, reset_after=False)),
}
_BUILT: dict[str, object] = {}


def built_keras_layer(name: str):
    """One built layer per case for the whole module (Keras layers are slow to make)."""
    if name not in _BUILT:
        layer = KERAS_LAYERS[name]()
        layer.build((None, None, FEATURES))
        _BUILT[name] = layer
    return _BUILT[name]


def _directions(layer) -> list:
    return ([layer.forward_layer, layer.backward_layer]
            if isinstance(layer, keras.layers.Bidirectional) else [layer])


def _run_both(keras_layer, module, seed: int, dtype=np.float32):
    """Run both on the same input and initial state; return (Keras', rnnkit's) output and states,
    rnnkit's in Keras' form: output (N, L, D*H) then each direction's h (and c), (N, H)."""
    parts = _directions(keras_layer)
    state_count = 2 if isinstance(parts[0], keras.layers.LSTM) else 1
    x = _random((BATCH, STEPS, FEATURES), seed, dtype)
    states = [_random((BATCH, UNITS), seed + 1 + k, dtype) for k in range(len(parts) * state_count)]
    expected = [torch.from_numpy(keras.ops.convert_to_numpy(t))
                for t in keras_layer(x, initial_state=states)]
    # Keras lists [h, c] per direction; rnnkit stacks directions: h_0 (D, N, H), c_0 likewise.
    per_kind = [np.stack(states[k::state_count]) for k in range(state_count)]
    hx = tuple(torch.from_numpy(s) for s in per_kind)
    output, final = module(torch.from_numpy(x), hx if state_count == 2 else hx[0])
    final = final if isinstance(final, tuple) else (final,)
    actual = [output] + [kind[d] for d in range(len(parts)) for kind in final]
    return expected, [t.detach() for t in actual]


@pytest.mark.parametrize("name", KERAS_LAYERS)
def test_from_keras_matches_keras_outputs_and_final_states(name):
    layer = built_keras_layer(name)
    module = rnnkit.from_keras(layer)
    inner = _directions(layer)[0]
    expected_type = {"LSTM": rnnkit.LSTM, "GRU": rnnkit.GRU, "SimpleRNN": rnnkit.RNN}
    assert type(module) is expected_type[type(inner).__name__]
    assert (module.input_size, module.hidden_size, module.num_layers) == (FEATURES, UNITS, 1)
    assert module.batch_first and module.bias == inner.use_bias
    assert module.bidirectional == isinstance(layer, keras.layers.Bidirectional)
    if isinstance(module, rnnkit.GRU):
        assert module.reset_after == inner.reset_after
    if isinstance(module, rnnkit.RNN):
        assert module.nonlinearity == "relu"
    expected, actual = _run_both(layer, module, seed=1)
    assert [t.shape for t in actual] == [t.shape for t in expected]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", KERAS_LAYERS)
def test_keras_round_trip_gives_identical_weights(name):
    layer = built_keras_layer(name)
    module = rnnkit.from_keras(layer)
    if module.bias and not getattr(module, "reset_after", False):
        # One Keras bias per gate: all of it is the input bias.
        for direction in ("", "_reverse")[: 1 + module.bidirectional]:
            assert torch.count_nonzero(getattr(module, "bias_ih_l0" + direction)) > 0
            assert torch.count_nonzero(getattr(module, "bias_hh_l0" + direction)) == 0
    back = rnnkit.to_keras(module)
    assert type(back) is type(layer)
    for original, converted in zip(_directions(layer), _directions(back), strict=True):
        assert type(converted) is type(original)
        assert converted.return_sequences and converted.return_state
        for option in ("units", "use_bias", "go_backwards", "activation", "reset_after"):
            assert getattr(converted, option, None) == getattr(original, option, None), option
    original_weights, converted_weights = layer.get_weights(), back.get_weights()
    assert [w.shape for w in converted_weights] == [w.shape for w in original_weights]
    for original, converted in zip(original_weights, converted_weights, strict=True):
        np.testing.assert_array_equal(converted, original)


def _with_random_parameters(module, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) - 0.5)
    return module


# batch_first=True as the comparison feeds Keras' batch-major input (to_keras ignores it: the
# weights do not depend on it).
RNNKIT_MODULES = {
    "lstm": lambda: rnnkit.LSTM(FEATURES, UNITS, batch_first=True),
    "gru-reset-after-float64": lambda: rnnkit.GRU(FEATURES, UNITS, batch_first=True,
                                                  dtype=torch.float64),
    "gru-reset-before": lambda: rnnkit.GRU(FEATURES, UNITS, batch_first=True, reset_after=False),
    "bidirectional-gru-no-bias": lambda: rnnkit.GRU(FEATURES, UNITS, bias=False,
                                                    bidirectional=True, batch_first=True),
    "rnn-tanh": lambda: rnnkit.RNN(FEATURES, UNITS, batch_first=True),
    "bidirectional-lstm": lambda: rnnkit.LSTM(FEATURES, UNITS, bidirectional=True,
                                              batch_first=True),
}


@pytest.mark.parametrize("name", RNNKIT_MODULES)
def test_to_keras_matches_rnnkit_and_comes_back(name):
    # Every parameter random, recurrent biases included: the ones Keras folds into its one bias.
    module = _with_random_parameters(RNNKIT_MODULES[name](), seed=len(name)).train(False)
    layer = rnnkit.to_keras(module)
    assert layer.built and layer.dtype == str(module.weight_ih_l0.dtype).removeprefix("torch.")
    for part in _directions(layer):  # built with zeros, then Keras' default initialisers restored
        config = part.get_config()
        assert config["kernel_initializer"]["class_name"] == "GlorotUniform"
        assert config["recurrent_initializer"]["class_name"] == "Orthogonal"
    dtype = module.weight_ih_l0.dtype
    expected, actual = _run_both(layer, module, seed=2, dtype=np.float64
                                 if dtype == torch.float64 else np.float32)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)

    back = rnnkit.from_keras(layer)
    assert back.weight_ih_l0.dtype == dtype
    folded = module.bias and not getattr(module, "reset_after", False)
    for key, value in module.state_dict().items():
        if folded and key.startswith("bias_ih"):
            recurrent = module.state_dict()[key.replace("bias_ih", "bias_hh")]
            torch.testing.assert_close(back.state_dict()[key], value + recurrent, rtol=0, atol=0)
        elif folded and key.startswith("bias_hh"):
            assert torch.count_nonzero(back.state_dict()[key]) == 0
        else:
            assert torch.equal(back.state_dict()[key], value), key


def test_bfloat16_weights_convert_exactly():
    # NumPy has no bfloat16: the conversion goes through float64, exact both ways.
    module = _with_random_parameters(rnnkit.GRU(FEATURES, UNITS, dtype=torch.bfloat16), seed=3)
    layer = rnnkit.to_keras(module)
    assert layer.cell.kernel.dtype == "bfloat16"
    back = rnnkit.from_keras(layer)
    for key, value in module.state_dict().items():
        assert back.state_dict()[key].dtype == torch.bfloat16
        assert torch.equal(back.state_dict()[key], value), key


def test_from_keras_keeps_trainable_and_dtype():
    layer = keras.layers.GRU(UNITS, dtype="float64", trainable=False)
    layer.build((None, None, FEATURES))
    module = rnnkit.from_keras(layer)
    assert module.weight_ih_l0.dtype == torch.float64
    assert not any(p.requires_grad for p in module.parameters())


def _built(layer, batch=None):
    layer.build((batch, None, FEATURES))
    return layer


KERAS_REFUSALS = [
    (lambda: _built(keras.layers.LSTM(UNITS, activation="relu")), r"activation='relu'.*'tanh'"),
    (lambda: _built(keras.layers.GRU(UNITS, recurrent_activation="hard_sigmoid")),
     r"recurrent_activation='hard_sigmoid'.*'sigmoid'"),
    (lambda: _built(keras.layers.SimpleRNN(UNITS, activation="sigmoid")),
     r"activation='sigmoid'; rnnkit accepts 'tanh' or 'relu'"),
    (lambda: _built(keras.layers.LSTM(UNITS, go_backwards=True)), r"go_backwards=True"),
    (lambda: _built(keras.layers.GRU(UNITS, stateful=True), batch=BATCH), r"stateful=True"),
    (lambda: _built(keras.layers.LSTM(UNITS, dropout=0.25)), r"dropout=0.25"),
    (lambda: _built(keras.layers.GRU(UNITS, recurrent_dropout=0.5)), r"recurrent_dropout=0.5"),
    (lambda: _built(keras.layers.Bidirectional(keras.layers.LSTM(UNITS), merge_mode="sum")),
     r"merge_mode='sum'.*'concat'"),
    (lambda: _built(keras.layers.Bidirectional(
        keras.layers.LSTM(UNITS), backward_layer=keras.layers.LSTM(UNITS + 1, go_backwards=True))),
     r"forward layer with class=LSTM, input_size=5, hidden_size=4, .* backward one with "
     r"class=LSTM, input_size=5, hidden_size=5, .* share one configuration"),
    (lambda: _built(keras.layers.Bidirectional(
        keras.layers.GRU(UNITS), backward_layer=keras.layers.LSTM(UNITS, go_backwards=True))),
     r"forward layer with class=GRU, .* backward one with class=LSTM"),
    (lambda: keras.layers.LSTM(UNITS), r"not built.*build\(\(None, None, input_features\)\)"),
]


@pytest.mark.parametrize("make, match", KERAS_REFUSALS)
def test_from_keras_refuses_what_rnnkit_cannot_express(make, match):
    with pytest.raises(ValueError, match=match):
        rnnkit.from_keras(make())


@pytest.mark.parametrize(
    "value",
    [torch.nn.LSTM(3, 4), "LSTM", None],
    ids=["torch-lstm", "string", "none"],
)
def test_from_keras_refuses_other_objects(value):
    with pytest.raises(TypeError, match=r"from_keras expects a built Keras 3 keras\.layers\.LSTM"):
        rnnkit.from_keras(value)


def test_from_keras_refuses_other_keras_layers():
    with pytest.raises(TypeError, match=r"got <Dense"):
        rnnkit.from_keras(_built(keras.layers.Dense(UNITS)))


@pytest.mark.parametrize(
    "module, error, match",
    [
        (rnnkit.LSTM(3, 4, num_layers=2), ValueError, r"num_layers=2.*only num_layers=1"),
        (rnnkit.LSTM(3, 4, proj_size=2), ValueError, r"no equivalent of rnnkit.LSTM's proj_size=2"),
        (rnnkit.LSTM(3, 4, peephole=True), ValueError, r"peephole=True"),
        (rnnkit.GRU(3, 4, learn_initial_state=True, reset_after=False), ValueError,
         r"GRU's learn_initial_state=True;"),
        (torch.nn.GRU(3, 4), TypeError, r"to_keras expects an rnnkit RNN, LSTM or GRU, got GRU"),
        (rnnkit.LSTMCell(3, 4), TypeError, r"to_keras expects an rnnkit RNN, LSTM or GRU"),
    ],
)
def test_to_keras_refuses_what_keras_cannot_express(module, error, match):
    with pytest.raises(error, match=match):
        rnnkit.to_keras(module)


class _FailingBackend:
    """A meta-path finder that fails `import keras` the way Keras does without its backend."""

    def find_spec(self, name, path=None, target=None):
        if name == "keras":
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
        return None


def test_to_keras_without_keras_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` now fails as if absent
    with pytest.raises(ImportError, match=r'needs Keras 3: pip install "rnnkit\[keras\]"'):
        rnnkit.to_keras(rnnkit.GRU(3, 4))
    monkeypatch.setitem(sys.modules, "keras", type(sys)("keras"))
    monkeypatch.setattr(sys.modules["keras"], "__version__", "2.15.0", raising=False)
    with pytest.raises(ImportError, match=r"found keras 2\.15\.0: pip install"):
        rnnkit.to_keras(rnnkit.GRU(3, 4))
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setattr(sys, "meta_path", [_FailingBackend(), *sys.meta_path])
    with pytest.raises(ImportError, match=r"could not load its backend.*KERAS_BACKEND=torch"):
        rnnkit.to_keras(rnnkit.GRU(3, 4))


def test_rnnkit_does_not_import_keras():
    # A fresh interpreter: importing rnnkit, and from_keras on a non-layer, leave Keras unloaded.
    program = (
        "import sys, rnnkit\n"
        "try:\n"
        "    rnnkit.from_keras(object())\n"
        "except TypeError as error:\n"
        "    print('TypeError:', error)\n"
        "print('keras loaded:', 'keras' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120, check=True)
    assert "TypeError: from_keras expects a built Keras 3" in done.stdout
    assert "keras loaded: False" in done.stdout


def test_module_docstring_example_runs():
    example = keras_interop.__doc__.split("::\n", 1)[1]
    namespace: dict[str, object] = {}
    exec(compile(textwrap.dedent(example), "keras_interop example", "exec"), namespace)
    assert isinstance(namespace["gru"], rnnkit.GRU) and namespace["gru"].batch_first
    assert tuple(namespace["output"].shape) == (3, 5, 20)
    assert tuple(namespace["h_n"].shape) == (1, 3, 20)
    assert isinstance(namespace["back"], keras.layers.GRU)
    assert tuple(namespace["sequence"].shape) == (3, 5, 20)
    assert tuple(namespace["h"].shape) == (3, 20)
