"""Checkpoints: sharded torch.distributed.checkpoint saves, resume, export."""
