"""CPU speed as a plug-in: measured routes between PyTorch's operators and C++ kernels (Winograd convolutions, a
fused GroupNorm + SiLU + dropout), swapped into a built network. Nothing else in the package imports it except the
one switch, `ddpm_lightning.tasks.cpu_plugin` (conf `kernels`, `retain_freed_memory`); a GPU user can ignore it.

- `accelerate(net)`: the speed modules in place of the plain ones, same state dict (`blocks`);
- `sampling()`: the context in which the weights are fixed (Winograd transforms computed once per layer);
- `RoutesCallback`: the route decisions in every checkpoint, taken again on resume (`callback`);
- `enable(kernels)`, `retain_freed_memory()`: process settings (`settings`);
- `autotune`: the measurement, the route cache and the kernels' build; `python -m ddpm_lightning.cpu` builds them.
"""

from ddpm_lightning.cpu.blocks import Dropout, FusedResBlock, accelerate
from ddpm_lightning.cpu.callback import RoutesCallback
from ddpm_lightning.cpu.conv import sampling
from ddpm_lightning.cpu.settings import enable, retain_freed_memory

__all__ = ["Dropout", "FusedResBlock", "RoutesCallback", "accelerate", "enable", "retain_freed_memory", "sampling"]
