"""Spawners: the profile form and checks they share, and how each starts a server."""
