"""harness: SEER-style self-supervised pretraining (SwAV on RegNetY) at any scale."""

__version__ = "0.1.0"
