"""Other frameworks' files in and out: diffusers UNet2DModel / DDPMPipeline folders."""
