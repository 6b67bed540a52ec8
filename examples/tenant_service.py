"""An aiohttp service that attributes LLM cost per tenant, through llmtally, with tags.

The service sets `x-llmtally-tag-tenant` on each call; llmtally puts it in the record's `tags` (and
does not forward it), so cost per tenant is a group-by away. From the repository, once `make serve`
or `make test` has made `.venv`, in one shell (add `--fake-upstream` to `llmtally serve` to have
llmtally's built-in fake answer every call: no key, no network):

    .venv/bin/llmtally serve > records.jsonl &    # the proxy on :8787 in the background, records to a file
    OPENAI_API_KEY=sk-... .venv/bin/python examples/tenant_service.py &    # this service on :8080
    curl -sS -X POST localhost:8080/ask -H 'X-Tenant: acme' -d 'What is 2+2?'
    curl -sS -X POST localhost:8080/ask -H 'X-Tenant: globex' -d 'And 3+3?'
    kill %2 %1; wait                  # stop both: llmtally writes every record before it exits
    .venv/bin/llmtally report --by tag:tenant records.jsonl
"""

import os

from aiohttp import web
from openai import AsyncOpenAI

LLMTALLY_URL = os.environ.get("LLMTALLY_URL", "http://127.0.0.1:8787")
MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
CLIENT_KEY: web.AppKey[AsyncOpenAI] = web.AppKey("openai")


async def ask(request: web.Request) -> web.Response:
    tenant = request.headers.get("X-Tenant", "unknown")
    question = await request.text()
    client = request.app[CLIENT_KEY]
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        extra_headers={"x-llmtally-tag-tenant": tenant},
    )
    return web.json_response({"tenant": tenant, "answer": reply.choices[0].message.content})


def create_app(llmtally_url: str = LLMTALLY_URL) -> web.Application:
    app = web.Application()
    app[CLIENT_KEY] = AsyncOpenAI(base_url=f"{llmtally_url}/openai/v1")
    app.router.add_post("/ask", ask)
    return app


if __name__ == "__main__":
    web.run_app(create_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
