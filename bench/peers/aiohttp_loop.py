"""Peer (b): an asyncio/aiohttp uploader, CONCURRENCY files at once, one shared session.

Each file is read whole into memory (as the SDK does), then declared and uploaded.

usage: aiohttp_loop.py BASE_URL TOKEN DIR CONCURRENCY
With CA_FILE set, HTTPS trusts that CA (an ssl context, as a user would give aiohttp).
"""
import asyncio
import os
import ssl
import sys

import aiohttp

base, token, folder, conc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


async def one(session, sem, name):
    async with sem:
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        body = {"type": "audio", "languageTag": "en-us", "vertical": "default",
                "includeAiResults": False, "originalFilename": name}
        async with session.post(f"{base}/interactions", json=body) as r:
            r.raise_for_status()
            iid = (await r.json())["interactionIdentifier"]
        form = aiohttp.FormData()
        form.add_field(name, data, filename=name, content_type="application/octet-stream")
        async with session.post(f"{base}/interactions/{iid}/upload", data=form) as r:
            if r.status != 201:
                raise RuntimeError(f"{name}: upload answered {r.status}")


async def main():
    names = sorted(n for n in os.listdir(folder) if n.endswith(".wav"))
    sem = asyncio.Semaphore(conc)
    ca = os.environ.get("CA_FILE")
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    conn = aiohttp.TCPConnector(limit=conc, ssl=ctx) if ctx else aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(headers={"X-API-Token": token}, connector=conn) as s:
        await asyncio.gather(*(one(s, sem, n) for n in names))
    print(len(names))


asyncio.run(main())
