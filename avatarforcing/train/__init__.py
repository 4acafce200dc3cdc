"""Training: the tiny autoencoder, the teacher, and the two-stage streaming distillation.

``avatarforcing train all`` runs every stage in order into one run folder (resumable: a stage
whose final weights exist is skipped, an interrupted stage continues from its last checkpoint)
and writes the serving checkpoint. See ``pipeline.py`` for the recipe and its budget.
"""
