"""The Shapes world: a procedural long-tail world so the whole loop runs on a CPU in minutes."""
