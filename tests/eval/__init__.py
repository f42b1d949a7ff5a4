"""Tests of harness.eval."""
