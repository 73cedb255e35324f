"""The native recurrence operators (layer norm, recurrent dropout, zoneout) against the reference
loop: outputs and final states, and every gradient the contract's formula builds from the kernels'
per-step gradients (written out here) against autograd through the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compare import TOLERANCE
from rnnkit.engine.native import build
from rnnkit.engine.native import functions as native
from rnnkit.engine.reference import run_direction
from rnnkit.engine.steps import CellKind, CellWeights, Masks

INPUT, STEPS = 4, 5
HIDDEN = {torch.float32: 18, torch.float64: 10}  # a full vector and a partial one either way
PROJ = 7
LENGTHS = {1: [3], 3: [3, STEPS, 1]}  # unsorted, with a length-1 row
UPSTREAM_SCALE = 0.1

# family name: (kind, peephole, projection)
FAMILIES = {
    "lstm": (CellKind("lstm"), False, False),
    "lstm_peephole": (CellKind("lstm"), True, False),
    "lstm_projection": (CellKind("lstm"), False, True),
    "lstm_peephole_projection": (CellKind("lstm"), True, True),
    "gru": (CellKind("gru"), False, False),
    "gru_reset_before": (CellKind("gru", reset_after=False), False, False),
    "rnn_tanh": (CellKind("rnn"), False, False),
    "rnn_relu": (CellKind("rnn", nonlinearity="relu"), False, False),
}

# switch name: (layer norm, recurrent mask, zoneout: None | "train" | "eval")
SWITCHES = {
    "plain": (False, False, None),
    "layer_norm": (True, False, None),
    "recurrent_mask": (False, True, None),
    "zoneout_train": (False, False, "train"),
    "zoneout_eval": (False, False, "eval"),
    "all_train": (True, True, "train"),
    "all_eval": (True, True, "eval"),
}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    loaded = build.kernels()
    if loaded is None:
        pytest.fail(f"the native kernels did not build: {build.failure()}")
    return loaded


class Case:
    """One configuration's leaves (inputs and parameters, all requiring grad), masks, lengths
    and upstream gradients, drawn from a fixed seed."""

    def __init__(self, family, switch, reverse, with_lengths, batch, dtype=torch.float32,
                 steps=STEPS):
        kind, peephole, projection = FAMILIES[family]
        layer_norm, masked, zoneout = SWITCHES[switch]
        if kind.family == "gru" and not kind.reset_after:
            layer_norm = False  # no whole W_hh h to normalise: the spec refuses it
        self.kind, self.reverse, self.dtype = kind, reverse, dtype
        self.layer_norm, self.steps, self.batch = layer_norm, steps, batch
        generator = torch.Generator().manual_seed(11)
        H = self.hidden = HIDDEN[dtype]
        G = {"lstm": 4, "gru": 3, "rnn": 1}[kind.family.value]
        P = self.out = PROJ if projection else H
        self.lstm = kind.family == "lstm"

        def draw(*shape, scale=1.0, offset=0.0):
            values = (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * scale
            return (values + offset).requires_grad_()

        self.leaves = {
            "x": draw(steps, batch, INPUT),
            "h0": draw(batch, P, scale=0.8),
            "w_ih": draw(G * H, INPUT, scale=0.6),
            "w_hh": draw(G * H, P, scale=0.5),
            "b_ih": draw(G * H, scale=0.3),
            "b_hh": draw(G * H, scale=0.3),
        }
        if self.lstm:
            self.leaves["c0"] = draw(batch, H, scale=0.8)
        if peephole:
            self.leaves["w_ch"] = draw(3 * H, scale=0.5)
        if projection:
            self.leaves["w_hr"] = draw(P, H, scale=0.5)
        if layer_norm:
            self.leaves["gain_ih"] = draw(G * H, scale=0.3, offset=1.0)
            self.leaves["gain_hh"] = draw(G * H, scale=0.3, offset=1.0)
            if self.lstm:
                self.leaves["gain_c"] = draw(H, scale=0.3, offset=1.0)
                self.leaves["shift_c"] = draw(H, scale=0.3)

        def keep_mask(*shape, p):
            return torch.bernoulli(torch.full(shape, p, dtype=dtype), generator=generator)

        self.recurrent_mask = keep_mask(batch, P, p=0.7) / 0.7 if masked else None
        self.zoneout_h = self.zoneout_c = None
        if zoneout == "train":
            self.zoneout_h = keep_mask(steps, batch, P, p=0.4)
            if self.lstm:
                self.zoneout_c = keep_mask(steps, batch, H, p=0.6)
        elif zoneout == "eval":
            self.zoneout_h = torch.tensor(0.3, dtype=dtype)
            if self.lstm:
                self.zoneout_c = torch.tensor(0.6, dtype=dtype)
        self.lengths = torch.tensor(LENGTHS[batch]) if with_lengths else None
        # Upstream gradients a tenth the usual size: summed over steps, batch and layer
        # norm's rows, the gradients reach ~20 otherwise, where float32's rounding (the
        # reference's own, too) passes the absolute 1e-5 on elements that cancel to small values.
        def upstream(*shape):
            return torch.randn(shape, generator=generator, dtype=dtype) * UPSTREAM_SCALE

        self.d_output = upstream(steps, batch, P)
        self.d_h_n = upstream(batch, P)
        self.d_c_n = upstream(batch, H)

    def get(self, name):
        return self.leaves.get(name)

    # ---- the reference: the spec's loop on autograd --------------------------------------------

    def reference(self):
        leaf = self.get
        weights = CellWeights(
            weight_ih=leaf("w_ih"), weight_hh=leaf("w_hh"), bias_ih=leaf("b_ih"),
            bias_hh=leaf("b_hh"), weight_hr=leaf("w_hr"), weight_ch=leaf("w_ch"),
            layer_norm_ih=leaf("gain_ih"), layer_norm_hh=leaf("gain_hh"),
            layer_norm_c_weight=leaf("gain_c"), layer_norm_c_bias=leaf("shift_c"),
        )
        state = (leaf("h0"), leaf("c0")) if self.lstm else leaf("h0")
        masks = Masks(self.recurrent_mask, self.zoneout_h, self.zoneout_c)
        output, final = run_direction(self.kind, leaf("x"), state, weights, self.lengths,
                                      self.reverse, masks)
        finals = list(final) if self.lstm else [final]
        upstream = [self.d_output, self.d_h_n] + ([self.d_c_n] if self.lstm else [])
        names = list(self.leaves)
        grads = torch.autograd.grad([output, *finals], [self.leaves[n] for n in names], upstream)
        results = {"output": output, "h_n": finals[0]}
        if self.lstm:
            results["c_n"] = finals[1]
        results = {k: v.detach() for k, v in results.items()}
        results.update({f"grad:{n}": g for n, g in zip(names, grads, strict=True)})
        return results

    # ---- the native operators and the contract's formula ---------------------------------------

    def pre_x(self):
        """The input side as the contract builds it, on autograd."""
        leaf = self.get
        product = F.linear(leaf("x"), leaf("w_ih"))
        if self.layer_norm:
            product = F.layer_norm(product, product.shape[-1:], leaf("gain_ih"), eps=1e-5)
        if self.kind.family == "gru" and self.kind.reset_after:
            return product + leaf("b_ih")  # b_hh is r's: it goes to the operator
        return product + leaf("b_ih") + leaf("b_hh")

    def native(self):
        leaf = {n: t.detach() for n, t in self.leaves.items()}.get
        pre_x = self.pre_x()
        family = self.kind.family.value
        common = (self.recurrent_mask, self.zoneout_h)
        if family == "lstm":
            forward = native.lstm_recurrence_forward(
                pre_x.detach(), leaf("h0"), leaf("c0"), leaf("w_hh"), leaf("gain_hh"),
                leaf("gain_c"), leaf("shift_c"), leaf("w_hr"), leaf("w_ch"), *common,
                self.zoneout_c, self.lengths, self.reverse)
        elif family == "gru":
            forward = native.gru_recurrence_forward(
                pre_x.detach(), leaf("h0"), leaf("w_hh"),
                leaf("b_hh") if self.kind.reset_after else None, leaf("gain_hh"), *common,
                self.lengths, self.reverse, self.kind.reset_after)
        else:
            forward = native.rnn_recurrence_forward(
                pre_x.detach(), leaf("h0"), leaf("w_hh"), leaf("gain_hh"), *common, self.lengths,
                self.reverse, self.kind.nonlinearity == "relu")
        self.forward = forward
        results = {"output": forward[0], "h_n": forward[1]}
        if family == "lstm":
            results["c_n"] = forward[2]
        grads = getattr(self, f"_{family}_gradients")(pre_x, forward, leaf)
        results.update({f"grad:{n}": grads[n] for n in self.leaves})
        return results

    def native_folded(self):
        """The LSTM kernels with the input side's layer norm folded in: the bare product
        ``W_ih x``, γ_ih and the summed bias go in; the raw product's gradient and the gain,
        bias and peephole sums come out of the backward."""
        leaf = {n: t.detach() for n, t in self.leaves.items()}.get
        product = F.linear(self.get("x"), self.get("w_ih"))
        bias = leaf("b_ih") + leaf("b_hh")
        forward = native.lstm_recurrence_forward(
            product.detach(), leaf("h0"), leaf("c0"), leaf("w_hh"), leaf("gain_hh"),
            leaf("gain_c"), leaf("shift_c"), leaf("w_hr"), leaf("w_ch"), self.recurrent_mask,
            self.zoneout_h, self.zoneout_c, self.lengths, self.reverse, leaf("gain_ih"), bias)
        self.forward = forward
        h_states, c_states, gates, c_new, x_hat, rstd_hh, c_hat, rstd_c, mean_ih, rstd_ih = (
            forward[3:])
        (d_product_ih, d_product, d_h0, d_c0, d_w_hr, d_cell_norm, d_gain_ih, d_bias,
         d_gain_hh, d_gain_c, d_shift_c, d_w_ch) = native.lstm_recurrence_backward(
            self.d_output, self.d_h_n, self.d_c_n, *forward[3:11], leaf("w_hh"),
            leaf("gain_hh"), leaf("gain_c"), leaf("shift_c"), leaf("w_hr"), leaf("w_ch"),
            self.recurrent_mask, self.zoneout_h, self.zoneout_c, self.lengths, self.reverse,
            product.detach(), mean_ih, rstd_ih, leaf("gain_ih"))
        self.check_held_rows(gates, c_new, d_product_ih, mean_ih, rstd_ih)
        grads = dict(zip(("x", "w_ih"), torch.autograd.grad(
            product, [self.leaves["x"], self.leaves["w_ih"]], d_product_ih), strict=True))
        grads["w_hh"] = torch.einsum("tng,tnp->gp", d_product,
                                     self.masked(self.entering(h_states)))
        grads.update(h0=d_h0, c0=d_c0, b_ih=d_bias, b_hh=d_bias, gain_ih=d_gain_ih,
                     gain_hh=d_gain_hh, gain_c=d_gain_c, shift_c=d_shift_c)
        if "w_hr" in self.leaves:
            grads["w_hr"] = d_w_hr
        if "w_ch" in self.leaves:
            grads["w_ch"] = d_w_ch
        else:
            assert d_w_ch.numel() == 0
        results = {"output": forward[0], "h_n": forward[1], "c_n": forward[2]}
        results.update({f"grad:{n}": grads[n] for n in self.leaves})
        return results

    def entering(self, states):
        """The states entering every step, (T, N, ·), in time order."""
        return states[1:] if self.reverse else states[:-1]

    def masked(self, h):
        return h if self.recurrent_mask is None else h * self.recurrent_mask

    def _input_side(self, pre_x, d_pre_x):
        """Gradients of the leaves that build pre_x (x, w_ih, b_ih, b_hh where it is inside,
        gain_ih), by autograd through pre_x alone."""
        names = [n for n in ("x", "w_ih", "b_ih", "b_hh", "gain_ih") if n in self.leaves]
        grads = torch.autograd.grad(pre_x, [self.leaves[n] for n in names], d_pre_x,
                                    allow_unused=True)
        return {n: g for n, g in zip(names, grads, strict=True) if g is not None}

    def _lstm_gradients(self, pre_x, forward, leaf):
        (_, _, _, h_states, c_states, gates, c_new, x_hat, _, c_hat, _, _, _) = forward
        d_pre_x, d_product, d_h0, d_c0, d_w_hr, d_cell_norm, *sums = (
            native.lstm_recurrence_backward(
                self.d_output, self.d_h_n, self.d_c_n, *forward[3:11], leaf("w_hh"), leaf("gain_hh"),
                leaf("gain_c"), leaf("shift_c"), leaf("w_hr"), leaf("w_ch"), self.recurrent_mask,
                self.zoneout_h, self.zoneout_c, self.lengths, self.reverse))
        assert all(s.numel() == 0 for s in sums)  # the input norm is not folded here
        H = self.hidden
        self.check_held_rows(gates, c_new, d_pre_x)
        grads = self._input_side(pre_x, d_pre_x)
        dv = d_product if self.layer_norm else d_pre_x
        grads["w_hh"] = torch.einsum("tng,tnp->gp", dv, self.masked(self.entering(h_states)))
        grads["h0"], grads["c0"] = d_h0, d_c0
        if "w_hr" in self.leaves:
            grads["w_hr"] = d_w_hr
        if "w_ch" in self.leaves:
            c_prev = self.entering(c_states)
            d_i, d_f, _, d_o = d_pre_x.split(H, dim=-1)
            grads["w_ch"] = torch.cat([(d_i * c_prev).sum((0, 1)), (d_f * c_prev).sum((0, 1)),
                                       (d_o * c_new).sum((0, 1))])
        if self.layer_norm:
            grads["gain_hh"] = (d_pre_x * x_hat).sum((0, 1))
            grads["gain_c"] = (d_cell_norm * c_hat).sum((0, 1))
            grads["shift_c"] = d_cell_norm.sum((0, 1))
        else:
            assert d_product.numel() == 0 and d_cell_norm.numel() == 0
        return grads

    def _gru_gradients(self, pre_x, forward, leaf):
        _, _, states, gates, n_input, x_hat, rstd = forward
        d_pre_x, d_hidden, d_product, d_h0 = native.gru_recurrence_backward(
            self.d_output, self.d_h_n, states, gates, n_input, x_hat, rstd, leaf("w_hh"),
            leaf("gain_hh"), self.recurrent_mask, self.zoneout_h, self.lengths, self.reverse,
            self.kind.reset_after)
        self.check_held_rows(gates, n_input, d_pre_x)
        grads = self._input_side(pre_x, d_pre_x)
        hm = self.masked(self.entering(states))
        H = self.hidden
        if self.kind.reset_after:
            dv = d_product if self.layer_norm else d_hidden
            grads["w_hh"] = torch.einsum("tng,tnh->gh", dv, hm)
            grads["b_hh"] = d_hidden.sum((0, 1))
            if self.layer_norm:
                grads["gain_hh"] = (d_hidden * x_hat).sum((0, 1))
        else:
            assert d_hidden.numel() == 0 and d_product.numel() == 0
            grads["w_hh"] = torch.cat([
                torch.einsum("tng,tnh->gh", d_pre_x[..., : 2 * H], hm),
                torch.einsum("tng,tnh->gh", d_pre_x[..., 2 * H :], n_input),
            ])
        grads["h0"] = d_h0
        return grads

    def _rnn_gradients(self, pre_x, forward, leaf):
        _, _, states, raw, x_hat, rstd = forward
        d_pre_x, d_product, d_h0 = native.rnn_recurrence_backward(
            self.d_output, self.d_h_n, states, raw, x_hat, rstd, leaf("w_hh"), leaf("gain_hh"),
            self.recurrent_mask, self.zoneout_h, self.lengths, self.reverse,
            self.kind.nonlinearity == "relu")
        self.check_held_rows(raw, raw, d_pre_x)
        grads = self._input_side(pre_x, d_pre_x)
        dv = d_product if self.layer_norm else d_pre_x
        grads["w_hh"] = torch.einsum("tng,tnh->gh", dv, self.masked(self.entering(states)))
        if self.layer_norm:
            grads["gain_hh"] = (d_pre_x * x_hat).sum((0, 1))
        grads["h0"] = d_h0
        return grads

    def check_held_rows(self, *buffers):
        """Past a row's length every saved per-step buffer and per-step gradient is zero."""
        if self.lengths is None:
            return
        held = torch.arange(self.steps).unsqueeze(1) >= self.lengths  # (T, N)
        # The layer norm buffers, if any (the LSTM's last two: the folded input norm's).
        extra = [b for b in self.forward[-2:] if b.numel()]
        if self.lstm:
            extra += [b for b in self.forward[7:11] if b.numel()]
        for buffer in (*buffers, *extra, self.forward[0]):
            assert (buffer[held] == 0).all()


def assert_close_all(actual, expected, dtype):
    assert sorted(actual) == sorted(expected)
    tolerance = TOLERANCE[dtype]
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        torch.testing.assert_close(actual[key], expected[key], rtol=tolerance, atol=tolerance,
                                   msg=lambda m, k=key: f"{k}: {m}")


def check(case):
    assert_close_all(case.native(), case.reference(), case.dtype)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("switch", list(SWITCHES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_native_recurrence_equals_the_reference(family, switch, reverse, with_lengths, batch):
    check(Case(family, switch, reverse, with_lengths, batch))


LSTM_FAMILIES = [family for family in FAMILIES if family.startswith("lstm")]
NORMED_SWITCHES = [switch for switch, (layer_norm, _, _) in SWITCHES.items() if layer_norm]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("switch", NORMED_SWITCHES)
@pytest.mark.parametrize("family", LSTM_FAMILIES)
def test_the_lstm_kernels_with_the_input_norm_folded_in_equal_the_reference(
        family, switch, reverse, with_lengths, dtype):
    case = Case(family, switch, reverse, with_lengths, 3, dtype=dtype)
    assert_close_all(case.native_folded(), case.reference(), dtype)


@pytest.mark.parametrize("switch", ["all_train", "all_eval"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_native_recurrence_in_float64(family, switch):
    check(Case(family, switch, reverse=True, with_lengths=True, batch=3, dtype=torch.float64))


@pytest.mark.parametrize("paths", ["blas", "short"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_native_recurrence_on_every_product_path(kernels, family, paths):
    """Every step product on ATen's mm (threshold 0), and runs of 1-2 steps (the forward's
    dot-product kernel instead of a transposed weight)."""
    default, rows = kernels.blas_min_multiply_adds(), kernels.blas_min_rows()
    kernels.set_blas_min_multiply_adds(0 if paths == "blas" else default)
    kernels.set_blas_min_rows(0 if paths == "blas" else rows)  # whatever the CPU's profile
    try:
        for steps in [1, 2] if paths == "short" else [STEPS]:
            lengths = paths == "blas"
            check(Case(family, "all_train", False, lengths, 3, steps=steps))
            check(Case(family, "all_eval", True, lengths, 3, steps=steps))
    finally:
        kernels.set_blas_min_multiply_adds(default)
        kernels.set_blas_min_rows(rows)


def test_no_steps_keep_the_state():
    case = Case("lstm_projection", "all_eval", False, False, 3, steps=0)
    out, h_n, c_n, *_ = native.lstm_recurrence_forward(
        case.pre_x().detach(), case.get("h0").detach(), case.get("c0").detach(),
        case.get("w_hh").detach(), *(case.get(n).detach() for n in ("gain_hh", "gain_c",
                                                                     "shift_c", "w_hr")),
        None, case.recurrent_mask, case.zoneout_h, case.zoneout_c, None, False)
    assert out.shape == (0, 3, PROJ)
    assert torch.equal(h_n, case.get("h0")) and torch.equal(c_n, case.get("c0"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_empty_batch_gives_empty_results_and_zero_weight_gradients(family):
    case = Case(family, "all_train", True, False, 3)
    for name in ("x", "h0", "c0"):
        if name in case.leaves:  # keep no rows of the batch
            kept = case.leaves[name][:, :0] if name == "x" else case.leaves[name][:0]
            case.leaves[name] = kept.detach().requires_grad_()
    case.batch = 0
    case.recurrent_mask = case.recurrent_mask[:0]
    case.zoneout_h = case.zoneout_h[:, :0]
    case.zoneout_c = None if case.zoneout_c is None else case.zoneout_c[:, :0]
    case.d_output, case.d_h_n, case.d_c_n = case.d_output[:, :0], case.d_h_n[:0], case.d_c_n[:0]
    results = case.native()
    assert results["output"].shape == (STEPS, 0, case.out)
    assert all((g == 0).all() for n, g in results.items() if n.startswith("grad:"))


# ---- bad input gives a RuntimeError naming the kernel and the argument ----------------------

def lstm_arguments(**changes):
    T, N, H, P = 3, 2, 5, 5
    arguments = {
        "pre_x": torch.zeros(T, N, 4 * H), "h0": torch.zeros(N, P), "c0": torch.zeros(N, H),
        "w_hh": torch.zeros(4 * H, P), "gain_hh": None, "gain_c": None, "shift_c": None,
        "w_hr": None, "w_ch": None, "recurrent_mask": None, "zoneout_h": None,
        "zoneout_c": None, "lengths": None, "reverse": False, "gain_ih": None, "bias_ih": None,
    }
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize("changes,message", [
    ({"recurrent_mask": torch.ones(2, 6)}, r"lstm_recurrence_forward: recurrent_mask must have shape \[2, 5\], got \[2, 6\]"),
    ({"recurrent_mask": torch.ones(2, 5, dtype=torch.float64)}, r"lstm_recurrence_forward: recurrent_mask must be Float, got Double"),
    ({"zoneout_h": torch.ones(3, 2)}, r"lstm_recurrence_forward: zoneout_h must be a 0-dim probability or have shape \[3, 2, 5\], got \[3, 2\]"),
    ({"zoneout_c": torch.ones(3, 5, 2).transpose(1, 2)}, r"lstm_recurrence_forward: zoneout_c must be contiguous"),
    ({"gain_c": torch.ones(5)}, r"lstm_recurrence_forward: gain_c and shift_c must be given together, got gain_c alone"),
    ({"gain_hh": torch.ones(5)}, r"lstm_recurrence_forward: gain_hh must have shape \[20\], got \[5\]"),
    ({"lengths": torch.ones(2, dtype=torch.int32)}, r"lstm_recurrence_forward: lengths must be Long, got Int"),
    ({"gain_ih": torch.ones(20)}, r"lstm_recurrence_forward: gain_ih \(the input side's layer norm\) needs gain_hh"),
    ({"bias_ih": torch.ones(5)}, r"lstm_recurrence_forward: bias_ih must have shape \[20\], got \[5\]"),
])
def test_the_lstm_kernel_refuses_a_bad_argument_naming_it(changes, message):
    arguments = lstm_arguments(**changes)
    with pytest.raises(RuntimeError, match=message):
        # The kernel itself: the wrapper would make the transposed mask contiguous.
        build.kernels().lstm_recurrence_forward(*arguments.values())


def test_every_recurrence_kernel_checks_its_masks():
    x = torch.zeros(3, 2, 15)
    h0, w_hh = torch.zeros(2, 5), torch.zeros(15, 5)
    with pytest.raises(RuntimeError, match=r"gru_recurrence_forward: recurrent_mask must have shape \[2, 5\], got \[5, 2\]"):
        native.gru_recurrence_forward(x, h0, w_hh, None, None, torch.ones(5, 2), None, None,
                                      False, True)
    with pytest.raises(RuntimeError, match=r"gru_recurrence_forward: with reset_after=False, b_hh and gain_hh must be None"):
        native.gru_recurrence_forward(x, h0, w_hh, None, torch.ones(15), None, None, None,
                                      False, False)
    with pytest.raises(RuntimeError, match=r"rnn_recurrence_forward: zoneout_h must be a 0-dim probability or have shape \[3, 2, 5\], got \[3, 2, 4\]"):
        native.rnn_recurrence_forward(x[..., :5], h0, w_hh[:5], None, None, torch.ones(3, 2, 4),
                                      None, False, False)
    _, _, states, raw, x_hat, rstd = native.rnn_recurrence_forward(
        x[..., :5], h0, w_hh[:5], None, None, None, None, False, False)
    with pytest.raises(RuntimeError, match=r"rnn_recurrence_backward: recurrent_mask must have shape \[2, 5\], got \[1, 5\]"):
        native.rnn_recurrence_backward(torch.zeros(3, 2, 5), h0, states, raw, x_hat, rstd,
                                       w_hh[:5], None, torch.ones(1, 5), None, None, False, False)
    with pytest.raises(RuntimeError, match=r"rnn_recurrence_backward: gain_hh and normalised_hh must be given together, got gain_hh alone"):
        native.rnn_recurrence_backward(torch.zeros(3, 2, 5), h0, states, raw, None, None,
                                       w_hh[:5], torch.ones(5), None, None, None, False, False)
    forward = native.lstm_recurrence_forward(*lstm_arguments().values())
    with pytest.raises(RuntimeError, match=r"lstm_recurrence_backward: zoneout_c must be a 0-dim probability or have shape \[3, 2, 5\], got \[2, 5\]"):
        native.lstm_recurrence_backward(
            torch.zeros(3, 2, 5), h0, h0, *forward[3:11], torch.zeros(20, 5), None, None, None,
            None, None, None, None, torch.ones(2, 5), None, False)
    _, _, states, gates, n_input, x_hat, rstd = native.gru_recurrence_forward(
        x, h0, w_hh, None, None, None, None, None, False, True)
    with pytest.raises(RuntimeError, match=r"gru_recurrence_backward: recurrent_mask must have shape \[2, 5\], got \[2, 5, 1\]"):
        native.gru_recurrence_backward(torch.zeros(3, 2, 5), h0, states, gates, n_input, x_hat,
                                       rstd, w_hh, None, torch.ones(2, 5, 1), None, None, False,
                                       True)
