"""The gateway's HTTP API, one router per resource (as vLLM's entrypoints/openai): `chat`,
`models`, `admin`, `health`; `deps` holds what every handler gets (the gateway's parts, auth,
the admin preamble, the request bodies). `runtime/gateway.py` assembles them into the app."""
