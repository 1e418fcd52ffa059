"""Evaluation: reference solutions, the exact-error benchmark, FID/KID, trajectory analysis and plots."""
