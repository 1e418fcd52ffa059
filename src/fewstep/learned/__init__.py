"""Learned global solvers ("cards"): a base solver on a learned grid with learned evaluation offsets and update
corrections, fitted per model and NFE by final-sample distillation (docs/maths.md, "Learned global solvers")."""

from .card import Card, CardError, load_card, load_solver, save_card
from .solver import BASES, LearnedSolver

__all__ = ["BASES", "Card", "CardError", "LearnedSolver", "load_card", "load_solver", "save_card"]
