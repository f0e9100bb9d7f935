"""The LLM Router Node: an OpenAI-compatible HTTP server in front of one loaded model.

Rooms: `schemas` (request models, OpenAI-shaped errors), `backend` (the one narrow door to the
model), `scheduler` (slots, queue, step-by-step interleaving on a worker thread), `app` (routes),
`metrics` (Prometheus text), `router_client` (registration and heartbeat), `cli` (entry point)."""
