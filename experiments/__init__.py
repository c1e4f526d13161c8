"""Experiment scripts and the generators of the evidence pages (docs/): not part of the package."""
