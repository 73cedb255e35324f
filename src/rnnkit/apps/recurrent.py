"""The recurrent stack every app builds: one config (`RecurrentConfig`), one table of layer
families (`FAMILIES`) and the cell names it gives (`CELL_NAMES`), one builder (`build_recurrent`).

A cell name is a family (``lstm``, ``gru``, ``rnn``, ``mingru``, ``minlstm``, ``slstm``)
optionally followed by a variant, the same on every command (``--cell`` for one, ``--cells`` for
the commands that compare several):

====================  ==========================================================================
``lstm``              torch.nn's LSTM
``lstm-peephole``     i and f see c_{t-1}, o sees c_t (Gers & Schmidhuber 2000); = ``--peephole``
``lstm-projection``   h projected to hidden // 2 (as torch.nn's ``proj_size``)
``gru``               torch.nn's GRU (reset gate after W_hn)
``gru-reset-before``  the original GRU (Cho et al. 2014): reset before W_hn; = ``--reset-before``
``rnn``               Elman RNN, tanh
``rnn-relu``          Elman RNN, ReLU
``mingru``            minGRU (Feng et al. 2024): the gate reads x only, a scan over time
``mingru-log``        minGRU's log-space variant (h >= 0; the only one ``--backend log_scan`` runs)
``minlstm``           minLSTM (Feng et al. 2024): normalised f and i read x only
``minlstm-log``       minLSTM's log-space variant
====================  ==========================================================================

The switches (``peephole``, ``reset_before``, ``proj_size``, ``nonlinearity``) say the same as a
name and combine with it; a switch given for another family is refused. Settings that only some
families have are ignored by the others, so one config can describe a comparison of several cells:
``init="chrono"`` (Tallec & Ollivier 2018) leaves an RNN, a minGRU and a minLSTM at the default
draw, ``forget_bias`` touches LSTMs only (not minLSTM: its layer has no such argument). The
normalisation and regularisation switches (``layer_norm``, ``recurrent_dropout``, ``zoneout``,
``weight_drop``) change what a model is, so a family without them refuses them by name rather
than train something else than asked; so does a family given a ``backend`` it does not have
(the minimal layers run ``auto``, ``reference``, ``scan``, ``log_scan``, ``native``; sLSTM
``auto``, ``native``, ``fused``, ``reference``; torch.nn has neither).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from torch import nn

from rnnkit.configuration import LARGEST_COUNT, Check
from rnnkit.engine import BACKENDS
from rnnkit.engine.scan import BACKENDS as MINIMAL_BACKENDS
from rnnkit.engine.slstm import BACKENDS as SLSTM_BACKENDS
from rnnkit.layers import GRU, LSTM, RNN
from rnnkit.minimal import MinGRU, MinLSTM
from rnnkit.slstm import SLSTM

# The settings of `RecurrentConfig` beyond the ones every layer takes (hidden_size, num_layers,
# dropout, backend), each named by its field.
OPTIONAL_SETTINGS = frozenset({"init", "layer_norm", "recurrent_dropout", "zoneout", "weight_drop"})
REGULARISATION = ("layer_norm", "recurrent_dropout", "zoneout", "weight_drop")


@dataclass(frozen=True)
class StackFamily:
    """What the apps need to know of one family of layers to build it and check a config."""

    layer: type[nn.Module]  # the rnnkit layer: (input_size, hidden_size, num_layers, *,
        # dropout, batch_first, backend, **variant switches)
    backends: tuple[str, ...]  # the values its ``backend`` takes
    variants: dict[str, dict] = field(default_factory=dict)  # cell-name suffix -> switches
        # (``lstm-peephole``: {"peephole": True}); beyond torch.nn's three families, the
        # switches are the layer's own keyword arguments
    settings: frozenset[str] = frozenset()  # the `OPTIONAL_SETTINGS` it takes; the others are
        # ignored (init) or refused by name (regularisation)
    torch_nn: bool = False  # torch.nn has the same layer (``--backend torch.nn``)
    exports: bool = False  # `rnnkit export` writes it to ONNX (`rnnkit.export_onnx`)
    peer: str | None = None  # where torch.nn has none: the family of the same size a speed
        # comparison (`rnnkit lm throughput`) runs against


# One entry per family; a new layer family plugs into every app here.
FAMILIES: dict[str, StackFamily] = {
    "lstm": StackFamily(LSTM, BACKENDS, {"peephole": {"peephole": True},
                                         "projection": {"projection": True}},
                        OPTIONAL_SETTINGS, torch_nn=True, exports=True),
    "gru": StackFamily(GRU, BACKENDS, {"reset-before": {"reset_before": True}}, OPTIONAL_SETTINGS,
                       torch_nn=True, exports=True),
    "rnn": StackFamily(RNN, BACKENDS, {"relu": {"nonlinearity": "relu"}},
                       OPTIONAL_SETTINGS - {"init"}, torch_nn=True, exports=True),
    # The three below export as ONNX Scan loops (rnnkit.engine.onnx: ONNX has no operator
    # for their recurrences).
    "mingru": StackFamily(MinGRU, MINIMAL_BACKENDS, {"log": {"log_space": True}}, peer="gru",
                          exports=True),
    "minlstm": StackFamily(MinLSTM, MINIMAL_BACKENDS, {"log": {"log_space": True}},
                           peer="lstm", exports=True),
    # xLSTM's sLSTM: one head by default; "-heads4" as the paper's reference code runs it.
    "slstm": StackFamily(SLSTM, SLSTM_BACKENDS, {"exp": {"forget_gate": "exp"},
                                                 "heads4": {"num_heads": 4}}, peer="lstm",
                         exports=True),
}
TORCH_FAMILIES = ("lstm", "gru", "rnn")  # their switches are `RecurrentConfig`'s own
CELLS = {name: family.layer for name, family in FAMILIES.items()}
# Every cell name: (family, the switches it sets).
CELL_NAMES: dict[str, tuple[str, dict]] = {
    cell: (name, switches)
    for name, family in FAMILIES.items()
    for cell, switches in ((name, {}), *((f"{name}-{suffix}", switches)
                                         for suffix, switches in family.variants.items()))
}
INITS = ("default", "chrono")
NONLINEARITIES = ("tanh", "relu")
RECURRENT_BACKENDS = tuple(dict.fromkeys(
    (*(b for family in FAMILIES.values() for b in family.backends), "torch.nn")))
CHECKS_NONNEGATIVE_INT = Check(int, "an int >= 0 (at most 2**63 - 1)", "ints >= 0",
                               lambda v: 0 <= v <= LARGEST_COUNT)


@dataclass
class RecurrentConfig:
    """The recurrent stack of a model; every app embeds one (with its own defaults)."""

    cell: str = field(default="lstm", metadata={"choices": tuple(CELL_NAMES)})
        # lstm | gru | rnn | mingru | minlstm | slstm, or a variant: lstm-peephole,
        # lstm-projection, gru-reset-before, rnn-relu, mingru-log, minlstm-log, slstm-exp,
        # slstm-heads4
    hidden_size: int = field(default=256, metadata={"option": "--hidden", "check": "positive"})
        # units per layer (and direction)
    num_layers: int = field(default=1, metadata={"option": "--layers", "check": "positive"})
        # stacked layers
    dropout: float = field(default=0.0, metadata={"check": "probability"})
        # between layers (and before the app's output layer), in training only
    peephole: bool = False  # LSTM only: peephole connections (the same as --cell lstm-peephole)
    reset_before: bool = False  # GRU only: reset gate before W_hn, the original GRU
    proj_size: int = field(default=0, metadata={"check": CHECKS_NONNEGATIVE_INT})
        # LSTM only: h projected to this size (0: none)
    nonlinearity: str = field(default="tanh", metadata={"choices": NONLINEARITIES})
        # RNN only: tanh | relu (the same as --cell rnn-relu)
    init: str = field(default="default", metadata={"choices": INITS})
        # default | chrono (Tallec & Ollivier 2018; LSTM and GRU, the other cells keep the
        # default)
    forget_bias: float = 0.0  # added to the LSTM forget-gate bias at initialisation (1.0 per
        # Jozefowicz et al. 2015); other cells ignore it
    layer_norm: bool = False  # layer-normalised products and LSTM cell (Ba et al. 2016; GRU
        # with the reset gate after W_hn); this and the three below: LSTM, GRU, RNN only
    recurrent_dropout: float = field(default=0.0, metadata={"check": "probability"})
        # variational dropout on the state entering W_hh (Gal & Ghahramani 2016), training only
    zoneout: float = field(default=0.0, metadata={"check": "probability"})  # a unit keeps its
        # previous value with this probability (Krueger et al. 2017; LSTM: h and c)
    weight_drop: float = field(default=0.0, metadata={"check": "probability"})
        # DropConnect on W_hh, one mask per forward call (AWD-LSTM), training only
    backend: str = field(default="auto", metadata={"choices": RECURRENT_BACKENDS})
        # rnnkit engine: auto | reference | fused | native (LSTM, GRU, RNN, sLSTM), auto |
        # reference | scan | log_scan | native (minGRU, minLSTM); or torch.nn (LSTM, GRU, RNN's
        # plain cells, to compare)

    @property
    def family(self) -> str:
        """The cell's family, a key of `FAMILIES`: ``"lstm"``, ``"gru"``, ``"minlstm"``, ..."""
        return CELL_NAMES[self.cell][0]

    def check(self) -> None:
        """``ValueError`` for the settings that do not go together (`check_config` checks each
        one's range and choices first, then calls this)."""
        family = self.family
        self._check_family()
        for switch, given, owner in (("--peephole", self.peephole, "lstm"),
                                     ("--reset-before", self.reset_before, "gru"),
                                     ("--proj-size", self.proj_size, "lstm"),
                                     ("--nonlinearity", self.nonlinearity != "tanh", "rnn")):
            if given and family != owner:
                raise ValueError(f"{switch} is for --cell {owner} only, got --cell {self.cell}")
        if isinstance(self.forget_bias, bool) or not isinstance(self.forget_bias, (int, float)) \
                or not math.isfinite(self.forget_bias):
            raise ValueError(f"--forget-bias must be a finite number, got {self.forget_bias!r}")
        if self.forget_bias and self.init == "chrono" and family == "lstm":
            raise ValueError("--forget-bias and --init chrono both set the LSTM forget-gate "
                             "bias; choose one")
        for switch in ("recurrent_dropout", "zoneout", "weight_drop"):
            if getattr(self, switch) >= 1:
                raise ValueError(f"--{switch.replace('_', '-')} must be below 1 (at 1 nothing "
                                 f"is kept), got {getattr(self, switch)}")
        if self.layer_norm and family == "gru" and (
                self.reset_before or CELL_NAMES[self.cell][1].get("reset_before")):
            raise ValueError("--layer-norm needs the GRU's reset gate after W_hn: drop "
                             "--reset-before (or --cell gru-reset-before)")
        proj_size = self.layer_options().get("proj_size", 0)
        if CELL_NAMES[self.cell][1].get("projection") and not proj_size:
            raise ValueError("lstm-projection projects h to hidden // 2 units: it needs "
                             f"hidden >= 2, got {self.hidden_size}")
        if proj_size >= self.hidden_size:
            raise ValueError(f"--proj-size must be smaller than --hidden ({self.hidden_size}), "
                             f"got {proj_size}")

    def _check_family(self) -> None:
        """The settings the family does not have (see the module docstring) and its backend."""
        family, stack = self.family, FAMILIES[self.family]
        for setting in REGULARISATION:
            if getattr(self, setting) and setting not in stack.settings:
                owners = [name for name, other in FAMILIES.items() if setting in other.settings]
                owners = " or ".join(filter(None, (", ".join(owners[:-1]), owners[-1])))
                raise ValueError(f"--{setting.replace('_', '-')} is for --cell {owners}, got "
                                 f"--cell {self.cell} (its layer has no {setting})")
        if self.backend == "torch.nn" and not stack.torch_nn:
            raise ValueError(f"--backend torch.nn has no {self.cell} layer (torch.nn has "
                             f"{', '.join(n for n, f in FAMILIES.items() if f.torch_nn)}); "
                             f"--cell {self.cell} takes --backend {', '.join(stack.backends)}")
        if self.backend not in (*stack.backends, "torch.nn"):
            raise ValueError(f"--backend {self.backend} is not an engine of --cell {self.cell}; "
                             f"it takes {', '.join(stack.backends)}")
        # The one backend that needs a variant (the minimal families' log-space scan).
        if self.backend == "log_scan" and not CELL_NAMES[self.cell][1].get("log_space"):
            raise ValueError(f"--backend log_scan runs the log-space variant only (its b_t > 0 "
                             f"has a logarithm): use --cell {family}-log, or --backend scan; "
                             f"got --cell {self.cell}")

    def with_cell(self, name: str) -> RecurrentConfig:
        """This config for the cell ``name`` (a comparison's member): the switches of the name
        replace those of this config."""
        return replace(self, cell=name, peephole=False, reset_before=False,
                       nonlinearity="tanh",
                       proj_size=self.proj_size if CELL_NAMES[name][0] == "lstm" else 0)

    def layer_options(self) -> dict:
        """The rnnkit layer's variant arguments (see `make_recurrent`)."""
        family, switches = CELL_NAMES[self.cell]
        if family not in TORCH_FAMILIES:  # the name's switches are the layer's arguments
            options = dict(switches)
            if "init" in FAMILIES[family].settings:
                options["init"] = self.init
            for setting in REGULARISATION:  # refused by `check`; here for the layer to refuse
                if getattr(self, setting):
                    options[setting] = getattr(self, setting)
            return options
        options: dict = {}
        if family == "lstm":
            projection = self.proj_size or (self.hidden_size // 2
                                            if switches.get("projection") else 0)
            options |= {"peephole": self.peephole or switches.get("peephole", False),
                        "proj_size": projection, "forget_bias": self.forget_bias}
        if family == "gru":
            options["reset_after"] = not (self.reset_before or switches.get("reset_before"))
        if family == "rnn":
            options["nonlinearity"] = switches.get("nonlinearity", self.nonlinearity)
        if "init" in FAMILIES[family].settings:
            options["init"] = self.init
        # A switch given for another family goes through, for the layer to refuse by name.
        if self.peephole and family != "lstm":
            options["peephole"] = True
        if self.reset_before and family != "gru":
            options["reset_after"] = False
        if self.proj_size and family != "lstm":
            options["proj_size"] = self.proj_size
        if self.nonlinearity != "tanh" and family != "rnn":
            options["nonlinearity"] = self.nonlinearity
        for switch in ("layer_norm", "recurrent_dropout", "zoneout", "weight_drop"):
            if getattr(self, switch):  # the layer checks the values (p < 1, a GRU's form)
                options[switch] = getattr(self, switch)
        return options

    @property
    def output_size(self) -> int:
        """Features of the stack's output per step: the projection's size, else hidden."""
        return self.layer_options().get("proj_size") or self.hidden_size


def build_recurrent(config: RecurrentConfig, input_size: int, batch_first: bool = False,
                    chrono_max_length: int | None = None) -> nn.Module:
    """The stack ``config`` describes, reading ``input_size`` features per step.

    ``chrono_max_length`` is chrono initialisation's T_max, the longest dependency the app
    expects (its sequence length); required when ``config.init == "chrono"``.
    """
    # The layers check what they are given (sizes, dropout, a variant for the wrong family);
    # the one thing they cannot see is a projection that a small hidden size rounds away.
    options = config.layer_options()
    if config.family not in TORCH_FAMILIES:
        if config.backend == "torch.nn":
            raise ValueError(f"torch.nn has no {config.cell} layer; use an rnnkit backend: "
                             f"{', '.join(FAMILIES[config.family].backends)}")
        init = options.pop("init", "default")
        if init != "default":
            options |= {"init": init, "chrono_max_length": chrono_max_length}
        # torch.nn's convention: dropout acts between layers, so one layer has none to warn of
        return CELLS[config.family](
            input_size, config.hidden_size, config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0, batch_first=batch_first,
            backend=config.backend, **options)
    if CELL_NAMES[config.cell][1].get("projection") and not options["proj_size"]:
        raise ValueError("lstm-projection projects h to hidden // 2 units: it needs hidden >= 2, "
                         f"got {config.hidden_size}")
    init = options.pop("init", "default")
    return make_recurrent(
        config.family, input_size, config.hidden_size, config.num_layers, config.dropout,
        backend=config.backend, batch_first=batch_first, init=init,
        chrono_max_length=chrono_max_length if init == "chrono" else None, **options)


def make_recurrent(cell: str, input_size: int, hidden_size: int, num_layers: int,
                   dropout: float = 0.0, peephole: bool = False, reset_after: bool = True,
                   backend: str = "auto", batch_first: bool = False, init: str = "default",
                   chrono_max_length: int | None = None, nonlinearity: str = "tanh",
                   forget_bias: float = 0.0, proj_size: int = 0,
                   **regularisation) -> nn.Module:
    """A stack of ``num_layers`` recurrent layers of ``cell`` (lstm | gru | rnn: the families
    torch.nn has; `build_recurrent` builds every family).

    ``dropout`` applies between layers (torch.nn's convention); ``peephole`` and ``proj_size``
    (h projected to that size, as torch.nn) are for LSTM only and
    ``reset_after=False`` (the original GRU) for GRU only. ``backend`` is an rnnkit engine, or
    ``"torch.nn"`` for the plain torch.nn layer (comparisons; it has no variants).
    ``init="chrono"`` (LSTM, GRU) draws the gate biases of Tallec & Ollivier 2018 for
    dependencies up to ``chrono_max_length`` steps. ``regularisation``: the layers'
    ``layer_norm``, ``recurrent_dropout``, ``zoneout``, ``weight_drop`` (rnnkit backends only).
    """
    if cell not in TORCH_FAMILIES:
        raise ValueError(f"cell must be one of {', '.join(TORCH_FAMILIES)}, got {cell!r}")
    if peephole and cell != "lstm":
        raise ValueError(f"peephole connections exist for the lstm cell only, not {cell!r}")
    if not reset_after and cell != "gru":
        raise ValueError(f"the reset-before variant exists for the gru cell only, not {cell!r}")
    layer_dropout = dropout if num_layers > 1 else 0.0
    common = dict(num_layers=num_layers, dropout=layer_dropout, batch_first=batch_first)
    if nonlinearity != "tanh" and cell != "rnn":
        raise ValueError(f"nonlinearity={nonlinearity!r} is for the rnn cell only, not {cell!r}")
    if proj_size and cell != "lstm":
        raise ValueError(f"proj_size={proj_size} is for the lstm cell only, not {cell!r}")
    if forget_bias and cell != "lstm":
        raise ValueError(f"forget_bias={forget_bias} is for the lstm cell only, not {cell!r}")
    if init != "default" and cell == "rnn":
        raise ValueError(f"init={init!r} exists for the lstm and gru cells, not 'rnn'")
    if backend == "torch.nn":
        if regularisation:
            raise ValueError(f"torch.nn has no {', '.join(regularisation)}; use an rnnkit "
                             "backend for those")
        if peephole or not reset_after or init != "default" or forget_bias:
            raise ValueError("torch.nn has no peephole LSTM, reset-before GRU or chrono "
                             "initialisation; use an rnnkit backend for those")
        projection = {"proj_size": proj_size} if proj_size else {}
        if cell == "rnn":
            projection["nonlinearity"] = nonlinearity
        return getattr(nn, cell.upper())(input_size, hidden_size, **common, **projection)
    variants = ({"peephole": peephole, "forget_bias": forget_bias, "proj_size": proj_size}
                if cell == "lstm" else {})
    if cell == "gru":
        variants["reset_after"] = reset_after
    if init != "default":
        variants |= {"init": init, "chrono_max_length": chrono_max_length}
    if cell == "rnn":
        variants["nonlinearity"] = nonlinearity
    return CELLS[cell](input_size, hidden_size, backend=backend, **common, **variants,
                       **regularisation)
