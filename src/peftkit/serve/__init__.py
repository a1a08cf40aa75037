"""``peftkit serve``: an OpenAI-compatible HTTP server for many adapters on one base model.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client). Nothing in the library
imports this package.
"""
