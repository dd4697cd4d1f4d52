"""Ray remote execution: ``initialize('ray', groups=...)`` reservations and samplers as replica actors."""
