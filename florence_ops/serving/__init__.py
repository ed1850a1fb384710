"""Use the model: `florence-ops predict` and `florence-ops serve`, both answering through `generation.answer`."""
