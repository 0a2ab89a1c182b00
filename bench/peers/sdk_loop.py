"""Peer (a): what the official ElevateAI Python SDK does, in a loop.

One file at a time. Like the SDK's DeclareAudioInteraction / UploadInteraction it calls
requests.request() for each call (a new connection each time) and hands requests an open file, which
requests reads whole into memory to build the multipart body.

usage: sdk_loop.py BASE_URL TOKEN DIR
"""
import json
import os
import sys

import requests

base, token, folder = sys.argv[1:4]
names = sorted(n for n in os.listdir(folder) if n.endswith(".wav"))
for name in names:
    headers = {"X-API-TOKEN": token, "Content-Type": "application/json"}
    payload = json.dumps({"type": "audio", "languageTag": "en-us", "vertical": "default",
                          "audioTranscriptionMode": "highAccuracy", "includeAiResults": False,
                          "originalFilename": name})
    r = requests.request("POST", f"{base}/interactions", headers=headers, data=payload)
    r.raise_for_status()
    iid = r.json()["interactionIdentifier"]
    with open(os.path.join(folder, name), "rb") as f:
        files = [(name, (name, f, "application/octet-stream"))]
        r = requests.request("POST", f"{base}/interactions/{iid}/upload",
                             headers={"X-API-TOKEN": token}, data={}, files=files)
    if r.status_code != 201:
        sys.exit(f"{name}: upload answered {r.status_code}")
print(len(names))
