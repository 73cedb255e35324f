"""How a layer runs: the one seam between sequence layers and the engines that execute them.

Layers call `run_direction` for each layer and direction of a stack; today it is the reference
loop, and faster engines take over here without the layers changing.
"""

from rnnkit.engine.reference import run_direction

__all__ = ["run_direction"]
