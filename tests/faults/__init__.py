"""Fault injection: each test breaks one thing under load and the oracle accounts for every tick."""
