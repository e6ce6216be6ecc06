"""ERNIE 4.5 MoE bridge conformance suite."""
