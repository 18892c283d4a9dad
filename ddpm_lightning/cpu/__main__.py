"""python -m ddpm_lightning.cpu: build the CPU kernels now (e.g. on a cluster's login node) rather than on first use."""

from ddpm_lightning.cpu import autotune

for name in ("group_norm", "winograd"):
    print(name, "ready" if autotune.kernel(name, wait=True) is not None else "unavailable")
