"""Conda channels: the repodata source, the record model, MatchSpec semantics and the writer."""
