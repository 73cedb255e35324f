"""README's Python examples run as written (in order, sharing one namespace), and its shapes hold."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # The shapes the README's comments promise.
    assert tuple(namespace["output"].shape) == (3, 7, 20)
    assert tuple(namespace["h"].shape) == (3, 8) and tuple(namespace["c"].shape) == (3, 20)
    assert tuple(namespace["y_t"].shape) == (1, 3, 20)
    assert tuple(namespace["y_s"].shape) == (3, 7, 20)
    assert all(tuple(t.shape) == (2, 3, 20) for t in (namespace[k] for k in ("h_s", "c_s", "n_s", "m_s")))
    assert all(bool(t.isfinite().all()) for t in namespace["s_state"])
    # rnnkit.diagnostics on an sLSTM
    assert tuple(namespace["kept"].shape) == (50, 8, 32)
    assert bool(((namespace["kept"] >= 0) & (namespace["kept"] <= 1)).all())
    assert 0 <= namespace["write_saturated"] <= 1
