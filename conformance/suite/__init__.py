"""The suite's test modules: `pytest --pyargs conformance --bridge NAME` runs them."""
