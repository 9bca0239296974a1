"""Exchange with other tools: diffusers UNet2DModel / DDPMScheduler folders."""
