"""Spice-style per-port backends; the interface they implement is the console's
(`vhostser.console.port`)."""
