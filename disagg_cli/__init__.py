"""disagg: serve a real LLM with prefill-decode disaggregation."""

__version__ = "0.1.0"
