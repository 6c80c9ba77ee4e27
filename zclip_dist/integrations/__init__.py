"""Front ends: the PyTorch drop-in and Lightning callback here; DeepSpeed and Megatron adapters."""
