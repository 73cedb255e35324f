"""The native engine is safe to load and hard to break: a trusted build cache, no stale build
lock, kernels that check their inputs, torch.nn's NaN convention, empty batches, and leave the
caller's floating-point mode as they found it."""

from __future__ import annotations

import fcntl
import os
import platform
import stat
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils import cpp_extension

import rnnkit
from compare import assert_same, outputs_and_gradients
from rnnkit import engine
from rnnkit.engine.native import build

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture
def loader(monkeypatch, tmp_path):
    """torch's extension loader replaced by a recorder of the build directories it is given
    (and of the umask it runs under), so no test here compiles; HOME is a fresh folder."""
    calls: list[Path] = []
    masks: list[int] = []

    def load(**arguments):
        calls.append(Path(arguments["build_directory"]))
        mask = os.umask(0)
        os.umask(mask)
        masks.append(mask)
        return types.SimpleNamespace(name=arguments["name"])

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failure", [])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(build.BUILD_DIR_VARIABLE, raising=False)
    loader = types.SimpleNamespace(calls=calls, masks=masks, home=tmp_path / "home")
    yield loader


def default_cache() -> Path:
    return build.default_build_directory(build.vector_capability())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plant(directory: Path) -> Path:
    """A folder holding a library as a build would leave it."""
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"rnnkit_native_{build.vector_capability().lower()}.so"
    library.write_bytes(b"not a library")
    return library


# ---- the build cache is trusted only when nobody else can have written to it -----------------

@pytest.mark.parametrize("spoil", [
    pytest.param(lambda d: os.chown(d, NOBODY, NOBODY), id="owned-by-another-user", marks=as_root),
    pytest.param(lambda d: d.chmod(0o777), id="writable-by-others"),
    pytest.param(lambda d: d.chmod(0o770), id="writable-by-group"),
])
def test_an_untrusted_configured_directory_is_never_loaded(loader, monkeypatch, tmp_path, spoil):
    planted = tmp_path / "planted"
    plant(planted)
    spoil(planted)
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(planted))
    with pytest.warns(build.NativeBuildWarning, match=rf"untrusted build directory: {planted} is (owned by uid {NOBODY}|writable by group or others).*Building them in {default_cache()} instead"):
        assert build.kernels() is not None
    assert loader.calls == [default_cache()]  # the default cache, fresh and private


@pytest.mark.parametrize("spoil", [
    pytest.param(lambda f: os.chown(f, NOBODY, NOBODY), id="library-owned-by-another-user", marks=as_root),
    pytest.param(lambda f: f.chmod(0o666), id="library-writable-by-others"),
    pytest.param(lambda f: f.with_name("evil.so").symlink_to(f), id="symbolic-link-inside"),
])
def test_a_directory_holding_an_untrusted_file_is_never_loaded(loader, monkeypatch, tmp_path, spoil):
    planted = tmp_path / "planted"
    library = plant(planted)
    spoil(library)
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(planted))
    with pytest.warns(build.NativeBuildWarning, match=rf"{planted} holds (a symbolic link, )?{planted}/"):
        build.kernels()
    assert loader.calls == [default_cache()]


def test_a_directory_in_a_folder_others_may_rename_in_is_never_loaded(loader, monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone may swap the build directory for their own
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(shared / "cache"))
    with pytest.warns(build.NativeBuildWarning, match=rf"{shared}/cache lies in {shared}, which is writable by group or others \(mode 777\) and not sticky"):
        build.kernels()
    assert loader.calls == [default_cache()]


@as_root
def test_when_the_default_cache_is_untrusted_too_a_fresh_private_directory_is_used(loader, monkeypatch, tmp_path):
    planted = tmp_path / "planted"
    plant(planted)
    os.chown(planted, NOBODY, NOBODY)
    plant(default_cache())
    os.chown(default_cache(), NOBODY, NOBODY)
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(planted))
    with pytest.warns(build.NativeBuildWarning, match=rf"{planted} is owned.*; {default_cache()} is owned.*Building them in"):
        build.kernels()
    [fresh] = loader.calls
    assert fresh.parent == Path(tempfile.gettempdir()).resolve()
    assert fresh.name.startswith("rnnkit-native-")
    assert mode(fresh) == 0o700 and fresh.stat().st_uid == os.getuid()


def test_a_fresh_cache_is_created_private_whatever_the_umask(loader):
    previous = os.umask(0)  # mkdir alone would make every folder 0777
    try:
        build.kernels()
    finally:
        os.umask(previous)
    assert loader.calls == [default_cache()]
    for folder in (loader.home, loader.home / ".cache", loader.home / ".cache" / "rnnkit",
                   default_cache()):
        assert mode(folder) == 0o700, folder
    assert loader.masks == [0o077]  # the build's own files are private too
    assert build.distrust(default_cache()) is None


def test_a_private_configured_directory_is_used_without_a_warning(loader, monkeypatch, tmp_path, recwarn):
    private = tmp_path / "private"
    plant(private)
    private.chmod(0o755)  # readable by others is fine: only writing is refused
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(private))
    build.kernels()
    assert loader.calls == [private]
    assert not [w for w in recwarn if issubclass(w.category, build.NativeBuildWarning)]


# ---- a stale build lock does not block; a live one is waited for, and said so ----------------

def build_in_thread() -> threading.Thread:
    thread = threading.Thread(target=build.kernels, daemon=True)
    thread.start()
    return thread


def test_a_stale_torch_lock_is_removed_and_the_build_proceeds(loader, monkeypatch, tmp_path, capsys):
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / build.TORCH_LOCK).touch()  # left by a build killed midway
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(directory))
    thread = build_in_thread()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert loader.calls == [directory]
    assert not (directory / build.TORCH_LOCK).exists()
    assert f"removing {directory / build.TORCH_LOCK}, left by an interrupted build" in capsys.readouterr().err


def test_a_live_build_is_waited_for_with_one_message(loader, monkeypatch, tmp_path, capsys):
    directory = tmp_path / "cache"
    directory.mkdir()
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(directory))
    with open(directory / build.BUILD_LOCK, "w") as other_process:
        fcntl.flock(other_process, fcntl.LOCK_EX)  # another open file: it conflicts like one
        thread = build_in_thread()
        message, deadline = "", time.monotonic() + 30
        while "waiting" not in message and time.monotonic() < deadline:
            time.sleep(0.05)
            message += capsys.readouterr().err
        assert f"waiting for another process's build of the native kernels in {directory}" in message
        time.sleep(0.2)
        assert loader.calls == [] and thread.is_alive()
    thread.join(timeout=30)  # closing the file released the lock
    assert not thread.is_alive()
    assert loader.calls == [directory]
    assert "waiting" not in capsys.readouterr().err  # said once


# ---- every tensor reaching a kernel is contiguous; the kernels check it -----------------------

INPUT, HIDDEN, PROJ = 3, 5, 2
LAYERS = {  # name: (class, arguments, gates)
    "rnn_tanh": (rnnkit.RNN, {}, 1),
    "rnn_relu": (rnnkit.RNN, {"nonlinearity": "relu"}, 1),
    "lstm": (rnnkit.LSTM, {}, 4),
    "lstm_peephole_proj": (rnnkit.LSTM, {"peephole": True, "proj_size": PROJ}, 4),
    "gru": (rnnkit.GRU, {}, 3),
    "gru_reset_before": (rnnkit.GRU, {"reset_after": False}, 3),
}
CELLS = {  # name: (class, arguments, gates)
    "rnn_relu": (rnnkit.RNNCell, {"nonlinearity": "relu"}, 1),
    "lstm": (rnnkit.LSTMCell, {}, 4),
    "lstm_peephole": (rnnkit.LSTMCell, {"peephole": True}, 4),
    "gru": (rnnkit.GRUCell, {}, 3),
    "gru_reset_before": (rnnkit.GRUCell, {"reset_after": False}, 3),
}


def kernels():
    loaded = build.kernels()
    if loaded is None:
        pytest.fail(f"the native kernels did not build: {build.failure()}")
    return loaded


def strided(shape, generator) -> nn.Parameter:
    """Random values at every other column of a wider tensor: a view with stride 2."""
    wide = torch.rand((*shape[:-1], 2 * shape[-1]), generator=generator, dtype=torch.float64)
    return nn.Parameter((wide - 0.5)[..., ::2])


def transposed(shape, generator) -> nn.Parameter:
    """Random values in a column-major layout (the transpose of a contiguous tensor)."""
    values = torch.rand(tuple(reversed(shape)), generator=generator, dtype=torch.float64) - 0.5
    return nn.Parameter(values.t())


def spoil_layouts(module: nn.Module, suffix: str) -> nn.Module:
    """Every weight and bias of ``module`` replaced by a non-contiguous parameter of its shape:
    ``bias_ih`` expanded from one value (the issue's), ``bias_hh`` strided, ``weight_ih``
    strided, ``weight_hh`` (and ``weight_hr``) transposed, ``weight_ch`` strided."""
    generator = torch.Generator().manual_seed(5)
    for name, parameter in list(module.named_parameters()):
        shape = parameter.shape
        if name == f"bias_ih{suffix}":
            spoiled = nn.Parameter(torch.full((1,), 0.5, dtype=torch.float64).expand(shape))
        elif name.startswith(("weight_hh", "weight_hr")):
            spoiled = transposed(shape, generator)
        elif name.startswith(("weight_", "bias_")):
            spoiled = strided(shape, generator)
        else:
            continue
        assert not spoiled.is_contiguous() and spoiled.shape == shape
        setattr(module, name, spoiled)
    return module


def native_against_reference(module, call, inputs):
    module.backend = "reference"
    expected = outputs_and_gradients(module, call, inputs)
    module.backend = "native"
    actual = outputs_and_gradients(module, call, inputs)
    assert_same(actual, expected, torch.float64)


@pytest.mark.parametrize("steps,batch", [(3, 2), (9, 4)], ids=["kernel-projection", "aten-projection"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_with_non_contiguous_weights_and_biases_equal_the_reference(name, steps, batch):
    kernels()
    layer_class, arguments, _ = LAYERS[name]
    layer = layer_class(INPUT, HIDDEN, num_layers=2, bidirectional=True, **arguments,
                        dtype=torch.float64)
    spoil_layouts(layer, "_l0")
    x = torch.randn(steps, batch, INPUT, dtype=torch.float64, requires_grad=True)
    native_against_reference(layer, lambda m: m(x), {"x": x})


@pytest.mark.parametrize("name", list(CELLS))
def test_cells_with_non_contiguous_weights_and_biases_equal_the_reference(name):
    kernels()
    cell_class, arguments, _ = CELLS[name]
    cell = spoil_layouts(cell_class(INPUT, HIDDEN, **arguments, dtype=torch.float64), "")
    x = torch.randn(2, INPUT, dtype=torch.float64, requires_grad=True)
    native_against_reference(cell, lambda m: m(x), {"x": x})


def test_the_issues_expanded_bias_at_hidden_2000():
    kernels()
    cell = rnnkit.LSTMCell(8, 2000)
    cell.bias_ih = nn.Parameter(torch.full((1,), 0.5).expand(8000))
    x = torch.randn(1, 8)
    h, c = cell(x)
    cell.backend = "reference"
    expected_h, expected_c = cell(x)
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(c, expected_c)


def kernel_arguments(hidden=HIDDEN, steps=3, batch=2):
    """Valid arguments of rnn_forward: pre (T, N, H), h0 (N, H), w_hh (H, H), lengths, ..."""
    return [torch.randn(steps, batch, hidden), torch.randn(batch, hidden),
            torch.randn(hidden, hidden), None, False, False]


@pytest.mark.parametrize("position,bad,message", [
    (2, torch.randn(HIDDEN, HIDDEN).t(), r"rnn_forward: w_hh must be contiguous, got shape \[5, 5\] with strides \[1, 5\]"),
    (1, torch.randn(1, HIDDEN).expand(2, HIDDEN), r"rnn_forward: h0 must be contiguous"),
    (0, torch.randn(3, 2, 2 * HIDDEN)[..., ::2], r"rnn_forward: pre must be contiguous"),
    (2, torch.randn(HIDDEN, HIDDEN + 1), r"rnn_forward: w_hh must have shape \[5, 5\], got \[5, 6\]"),
    (1, torch.randn(2, HIDDEN, dtype=torch.float64), r"rnn_forward: h0 must be Float, got Double"),
    (0, torch.randn(3, 2, HIDDEN).to(torch.float16), r"rnn_forward: pre must be float32 or float64, got Half"),
    (0, torch.randn(2, HIDDEN), r"rnn_forward: pre must have 3 dimensions, got shape \[2, 5\]"),
    (1, torch.empty(2, HIDDEN, device="meta"), r"rnn_forward: h0 must be on the CPU, got meta"),
    (3, torch.tensor([3, 2], dtype=torch.int32), r"rnn_forward: lengths must be Long, got Int"),
    (3, torch.tensor([3, 2, 1]), r"rnn_forward: lengths must have shape \[2\], got \[3\]"),
    (3, torch.tensor([4, 2]), r"rnn_forward: lengths must lie in \[1, 3\] \(the input's time "
                              r"steps\), got 4 at index 0"),
    (3, torch.tensor([3, 0]), r"rnn_forward: lengths must lie in \[1, 3\] .* got 0 at index 1"),
], ids=["w_hh-transposed", "h0-expanded", "pre-strided", "w_hh-shape", "h0-float64",
        "pre-float16", "pre-2d", "h0-meta", "lengths-int32", "lengths-size", "lengths-past-T",
        "lengths-zero"])
def test_a_kernel_refuses_a_bad_argument_naming_it(position, bad, message):
    arguments = kernel_arguments()
    arguments[position] = bad
    with pytest.raises(RuntimeError, match=message):
        kernels().rnn_forward(*arguments)


def test_every_kernel_checks_its_arguments():
    k, H = kernels(), HIDDEN
    x, w = torch.randn(3, 2, INPUT), torch.randn(4 * H, INPUT)
    with pytest.raises(RuntimeError, match=r"linear: bias must be contiguous"):
        k.linear(x, w, torch.full((1,), 0.5).expand(4 * H), None)
    with pytest.raises(RuntimeError, match=r"linear: second_bias needs bias"):
        k.linear(x, w, None, torch.zeros(4 * H))
    gates, h0 = torch.randn(3, 2, 4 * H), torch.randn(2, H)
    with pytest.raises(RuntimeError, match=r"lstm_forward: w_ch must have shape \[15\], got \[20\]"):
        k.lstm_forward(gates, None, h0, h0, torch.randn(4 * H, H), None, torch.randn(4 * H), None,
                       False, True)
    with pytest.raises(RuntimeError, match=r"lstm_forward: bias must have shape \[20\], got \[15\]"):
        k.lstm_forward(gates, torch.randn(3 * H), h0, h0, torch.randn(4 * H, H), None, None, None,
                       False, True)
    with pytest.raises(RuntimeError, match=r"gru_forward: b_hh must be contiguous"):
        k.gru_forward(torch.randn(3, 2, 3 * H), h0, torch.randn(3 * H, H),
                      torch.randn(6 * H)[::2], None, False, True)
    with pytest.raises(RuntimeError, match=r"rnn_backward: d_output must have shape \[3, 2, 5\], got \[3, 1, 5\]"):
        k.rnn_backward(torch.randn(3, 1, H), h0, torch.randn(3, 2, H), torch.randn(H, H), None,
                       False, False)
    with pytest.raises(RuntimeError, match=r"lstm_backward: c_states must have shape \[4, 2, 5\]"):
        k.lstm_backward(torch.randn(3, 2, H), h0, h0, gates, torch.randn(3, 2, H),
                        torch.randn(3, 2, H), torch.randn(4 * H, H), None, None, None, False)
    x1 = torch.randn(2, INPUT)
    with pytest.raises(RuntimeError, match=r"lstm_step: h must have shape \[2, 5\], got \[2, 4\]"):
        k.lstm_step(x1, torch.randn(2, H - 1), h0, w, torch.randn(4 * H, H), None, None, None,
                    None)
    with pytest.raises(RuntimeError, match=r"gru_step: b_ih and b_hh must be given together"):
        k.gru_step(x1, h0, torch.randn(3 * H, INPUT), torch.randn(3 * H, H), torch.zeros(3 * H),
                   None, True)
    with pytest.raises(RuntimeError, match=r"rnn_step: w_hh must be contiguous"):
        k.rnn_step(x1, h0, torch.randn(H, INPUT), torch.randn(H, H).t(), None, None, False)
    with pytest.raises(RuntimeError, match=r"gru_backward: w_hh must be contiguous"):
        k.gru_backward(torch.randn(3, 2, H), h0, torch.randn(3, 2, 3 * H), torch.randn(4, 2, H),
                       torch.randn(3, 2, H), torch.randn(H, 3 * H).t(), None, False, True)


# ---- a ReLU RNN propagates NaN as torch.nn does --------------------------------------------

@pytest.mark.parametrize("backend", ["native", "reference"])
def test_relu_rnn_given_nan_input_has_torch_nn_gradients(backend):
    kernels()
    layer = rnnkit.RNN(INPUT, HIDDEN, num_layers=2, nonlinearity="relu", dtype=torch.float64)
    layer.backend = backend
    torch_layer = nn.RNN(INPUT, HIDDEN, num_layers=2, nonlinearity="relu", dtype=torch.float64)
    torch_layer.load_state_dict(layer.state_dict())
    x = torch.randn(4, 3, INPUT, dtype=torch.float64)
    x[1, 0, 1] = float("nan")
    x.requires_grad_(True)
    actual = outputs_and_gradients(layer, lambda m: m(x), {"x": x})
    expected = outputs_and_gradients(torch_layer, lambda m: m(x), {"x": x})
    assert expected["out0"].isnan().any() and expected["grad:weight_ih_l0"].isnan().any()
    assert expected["grad:x"][1:, 0].abs().min() > 0  # where fused and native used to give 0
    for key in expected:
        assert torch.equal(actual[key].isnan(), expected[key].isnan()), key
        torch.testing.assert_close(actual[key], expected[key], equal_nan=True, msg=key)


def test_relu_backward_zeroes_a_nan_gradient_where_the_unit_is_off():
    # torch's threshold_backward selects: y <= 0 gives 0 even for a NaN gradient; y NaN passes.
    pre = torch.tensor([[[-1.0, 2.0, float("nan"), -3.0]]], dtype=torch.float64)  # (1, 1, 4)
    w_hh = torch.zeros(4, 4, dtype=torch.float64)
    h0 = torch.zeros(1, 4, dtype=torch.float64)
    _, states = kernels().rnn_forward(pre, h0, w_hh, None, False, True)
    d_output = torch.tensor([[[float("nan"), 5.0, 7.0, 1.0]]], dtype=torch.float64)
    d_pre, _ = kernels().rnn_backward(d_output, torch.zeros(1, 4, dtype=torch.float64), pre,
                                      w_hh, None, False, True)
    torch_pre = torch.tensor([-1.0, 2.0, float("nan"), -3.0], dtype=torch.float64,
                             requires_grad=True)
    torch.relu(torch_pre).backward(d_output.view(4))
    torch.testing.assert_close(states[1].view(4), torch.relu(torch_pre.detach()), equal_nan=True)
    torch.testing.assert_close(d_pre.view(4), torch_pre.grad, equal_nan=True)
    assert d_pre.view(4).tolist()[:2] == [0.0, 5.0]


# ---- an empty batch gives empty outputs and zero gradients, as torch.nn ---------------------

@pytest.mark.parametrize("backend", ["native", "fused"])
@pytest.mark.parametrize("name", list(CELLS))
def test_cells_with_an_empty_batch(backend, name):
    kernels()
    cell_class, arguments, _ = CELLS[name]
    cell = cell_class(INPUT, HIDDEN, **arguments, dtype=torch.float64)
    x = torch.randn(0, INPUT, dtype=torch.float64, requires_grad=True)
    cell.backend = "reference"
    expected = outputs_and_gradients(cell, lambda m: m(x), {"x": x})
    cell.backend = backend
    actual = outputs_and_gradients(cell, lambda m: m(x), {"x": x})
    assert_same(actual, expected, torch.float64)
    assert actual["out0"].shape == (0, HIDDEN)
    assert all(not g.any() for k, g in actual.items() if k.startswith("grad:"))
    if name in ("rnn_relu", "lstm", "gru"):  # the forms torch.nn has
        torch_expected = outputs_and_gradients(cell.to_torch(), lambda m: m(x), {"x": x})
        assert_same(actual, torch_expected, torch.float64)


def no_rows(name, steps, batch):
    """A layer of the family, an input (T, N, I) with T * N = 0 and its initial state."""
    layer_class, arguments, _ = LAYERS[name]
    layer = layer_class(INPUT, HIDDEN, **arguments, dtype=torch.float64)
    x = torch.randn(steps, batch, INPUT, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(batch, layer.output_size, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(batch, HIDDEN, dtype=torch.float64, requires_grad=True)
    state = (h0, c0) if layer.family == "lstm" else h0
    return layer, x, state, {"x": x, "h0": h0, "c0": c0}


def run_direction(x, state, backend):
    # A layer refuses an empty input at its boundary (layers.py); the engines below it take any
    # T * N = 0 (cells pass N = 0 down), so a direction is run through the engine seam.
    return lambda m: engine.run_direction(m.cell_kind(), x, state, m.cell_weights(0, 0), None,
                                          reverse=True, backend=backend)


@pytest.mark.parametrize("backend", ["native", "fused"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_layer_direction_with_an_empty_batch(backend, name):
    kernels()
    layer, x, state, inputs = no_rows(name, 4, 0)
    expected = outputs_and_gradients(layer, run_direction(x, state, "reference"), inputs)
    actual = outputs_and_gradients(layer, run_direction(x, state, backend), inputs)
    assert_same(actual, expected, torch.float64)
    assert actual["out0"].shape == (4, 0, layer.output_size)


@pytest.mark.parametrize("backend", ["native", "fused"])
@pytest.mark.parametrize("batch", [3, 0])
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_layer_direction_of_no_steps_keeps_its_state(backend, name, batch):
    # The reference loop stacks its steps, and cannot stack none: the expectation is written out.
    kernels()
    layer, x, state, inputs = no_rows(name, 0, batch)
    empty = torch.empty(0, batch, layer.output_size, dtype=torch.float64)
    expected = outputs_and_gradients(layer, lambda m: (empty, state), inputs)
    actual = outputs_and_gradients(layer, run_direction(x, state, backend), inputs)
    assert_same(actual, expected, torch.float64)


# ---- the caller's floating-point mode ------------------------------------------------------
SUBNORMAL = 1e-39  # in float32, below the smallest normal number (1.2e-38)
X86 = platform.machine().lower() in ("x86_64", "amd64")


def subnormals_survive() -> bool:
    """Whether Python-side ops still write subnormals, on this thread (a one-element product)
    and on every intra-op thread (a product large enough to be split between them)."""
    small = float(torch.tensor([SUBNORMAL]) * 1.0) != 0
    large = bool((torch.full((1 << 20,), SUBNORMAL) * 1.0).ne(0).all())
    return small and large


@pytest.mark.skipif(not X86, reason="the kernels flush subnormals on x86 only (MXCSR)")
def test_kernels_leave_the_callers_floating_point_mode_as_they_found_it():
    """The kernels compute with subnormals flushed to zero (FTZ and DAZ, issue 20) on the
    calling thread and in every parallel region, and give each thread its mode back: after
    training steps of four families on two threads (every product and head split between
    them), Python ops write subnormals again on both threads; a caller who flushes still
    flushes; `call_flushed` flushes both threads inside and restores their mode after, when its
    function raises too."""
    loaded = kernels()
    threads, minimum = torch.get_num_threads(), loaded.thread_min_multiply_adds()
    torch.set_num_threads(2)
    loaded.set_thread_min_multiply_adds(1)
    try:
        assert subnormals_survive()
        for layer in (rnnkit.SLSTM(3, 16, num_heads=2, backend="native"),
                      rnnkit.MinGRU(3, 16, backend="native"), rnnkit.LSTM(3, 16, backend="native"),
                      rnnkit.GRU(3, 16, backend="native")):
            layer(torch.randn(20, 70, 3))[0].sum().backward()
            assert subnormals_survive(), type(layer).__name__
        torch.set_flush_denormal(True)
        try:
            rnnkit.SLSTM(3, 16, backend="native")(torch.randn(5, 4, 3))[0].sum().backward()
            assert float(torch.tensor([SUBNORMAL]) * 1.0) == 0
        finally:
            torch.set_flush_denormal(False)
        # Inside call_flushed both threads flush: every part of the split product is zero.
        assert loaded.call_flushed(
            lambda: bool((torch.full((1 << 20,), SUBNORMAL) * 1.0).eq(0).all()))

        def fail():
            raise ValueError("raised inside")

        with pytest.raises(ValueError, match="raised inside"):
            loaded.call_flushed(fail)
        assert subnormals_survive()
    finally:
        torch.set_num_threads(threads)
        loaded.set_thread_min_multiply_adds(minimum)
