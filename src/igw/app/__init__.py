"""Composition: builds the parts, owns their tasks and their shutdown."""
