"""Applications built from the stages (the demo, the replica command): not stages themselves."""
