"""The HTTP API (FastAPI): OpenAI-compatible inference, the admin API, operations endpoints.

No tensor code lives here: the runtime is behind server/service.py.
"""
