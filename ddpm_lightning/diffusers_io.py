"""`python -m ddpm_lightning.diffusers_io export ...`, the command's name before the package had layers: runs
`python -m ddpm_lightning.interop.diffusers`."""

from ddpm_lightning.interop.diffusers import main

if __name__ == "__main__":
    main()
