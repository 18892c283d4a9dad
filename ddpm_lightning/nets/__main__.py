"""python -m ddpm_lightning.nets: build the CPU kernels now (e.g. on a cluster's login node) rather than on first use."""

from ddpm_lightning.nets import routes

for name in ("group_norm", "winograd"):
    print(name, "ready" if routes.kernel(name, wait=True) is not None else "unavailable")
