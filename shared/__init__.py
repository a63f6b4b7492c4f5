"""clipmesh: long-video generation across many GPU workers (the package both daemons import)."""
