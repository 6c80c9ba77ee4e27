"""Alias kept for scripts written against zclip_dist 0.1: ``-m zclip_dist.megatron_launch`` runs
:mod:`zclip_dist.megatron.launch`, the Megatron-LM launcher module, unchanged."""

from .megatron.launch import install, main

__all__ = ["install", "main"]

if __name__ == "__main__":
    main()
