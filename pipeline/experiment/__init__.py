"""``maskdm experiment``: measured comparisons of training strategies at equal compute."""
