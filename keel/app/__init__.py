"""keel.app: what a person or a server runs. Nothing below imports it.

- `keel.app.cli`: the `keel` command (`demo`, `run`, `threads`, `serve`, `audit`, `report`,
  `health`, `db`, `models`): its arguments, parsed with keel's light modules only; each
  subcommand's module loads when it runs (`cli_run`: demo and run, `cli_db`: threads and db,
  `cli_observe`, `cli_serve`, `cli_models`). `keel.app.cli_agent` loads `keel run --agent
  module:attr`.
- `keel.app.server`: graph factories for LangGraph server (`langgraph.json`), one per tenant.
- `keel.app.auth`: bearer-token auth for LangGraph server; `keel.app.server_config` its config file,
  `keel.app.agent_options` a served agent's memory / verify / fallback settings,
  `keel.app.server_memory` a tenant's memory on a Chroma server.
- `keel.app.http`: liveness, readiness and the semantic check as an ASGI app (`http.app`).
- `keel.app.serve`: `keel serve` (a `langgraph dev` with keel's config).
- `keel.app.aegra`: keel on Aegra (many replicas on PostgreSQL + Redis): the generated
  `aegra.json` and its file-path shim, factories that build without a user, replica settings.
- `keel.app.health`: liveness, readiness and the semantic check.
- `keel.app.report`: `keel report` (success rate, latency, cost, SLOs).
- `keel.app.demo`: the demo scenario's shop, tools and policy.

This package's `__init__` imports nothing: `keel.app.auth` reads the server config on import.
"""
