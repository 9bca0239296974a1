"""Maths and networks: the schedule, the UNet, the loss, the samplers, guidance and the EMA. Torch only; nothing here reads files or decides a device."""
