"""Alias kept for scripts written against zclip_dist 0.1: ``-m zclip_dist.launch`` runs
:mod:`zclip_dist.deepspeed.launch`, the DeepSpeed launcher module, unchanged."""

from .deepspeed.launch import install, main

__all__ = ["install", "main"]

if __name__ == "__main__":
    main()
