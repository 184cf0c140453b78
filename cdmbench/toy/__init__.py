"""The embedded toy world: procedural shapes data, a micro SD3-family teacher and toy evaluators."""
