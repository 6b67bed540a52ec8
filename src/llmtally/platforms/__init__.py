"""Platforms: the routes a dialect is billed through (direct, Azure OpenAI, Vertex AI, Bedrock).

A platform maps a request target to its dialect, model, upstream and auth, and undoes its own framing
(AWS event-stream); it never parses usage, which is the dialect's (:mod:`llmtally.providers`).
"""
