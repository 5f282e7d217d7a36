"""The OpenAI-compatible HTTP front end of `disagg serve` (FastAPI + uvicorn)."""
