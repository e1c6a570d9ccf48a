"""The OpenAI-compatible HTTP server: one engine loop shared by every connection."""
