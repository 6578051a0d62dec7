"""Rebuilding dense weights from labels and centroid tables: numpy reference, torch and Triton paths."""
