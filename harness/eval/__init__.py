"""Evaluation of trunks as the paper did it: k-NN, linear probes, low-shot and full fine-tuning."""
