"""``mambastep serve``: an HTTP server where a session's state is a durable, forkable,
downloadable resource, with OpenAI-compatible completions beside it.

    settings   ServeSettings: address, keys, limits, the hot set, the store's URL
    store      SessionStore: where sessions live; open_store(url) opens sqlite_store's
               SQLiteStore (the embedded default) or postgres_store's PostgresStore
    scheduler  the one thread that runs the model: prompts in pieces, decode steps batched
    service    what the routes do, transport aside: sessions, completions, limits, durability
    schemas    the requests and responses, as pydantic models (so /openapi.json is exact)
    metrics    the Prometheus metrics
    app        the FastAPI application: routes, keys, errors, server-sent events, the page
"""
