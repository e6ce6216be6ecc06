"""Adapters that plug real bridges into the suite."""
