"""AMED: the learned mean-direction predictor, its features, distillation training, recipes and checkpoints
(docs/maths.md §8)."""
