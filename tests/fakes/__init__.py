"""Fakes that stand in for the systems at memberhub's network edge in end-to-end tests."""
