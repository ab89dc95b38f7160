"""Run OpenRLHF's own remote-RM client against a gateway (executed by OpenRLHF's interpreter).

``openrlhf/utils/agent.py``'s ``SingleTurnAgentExecutor`` is what OpenRLHF 0.11 runs for
``--reward.remote_url URL1,URL2``: one sample per call, URLs in turn, aiohttp, 5 tries. The
packages' ``__init__`` files import torch, deepspeed and ray, which a test machine need not have,
so the two modules it uses (``agent``, ``logging_utils``) are loaded from the installed package
under empty parent packages: OpenRLHF's own code, untouched.

    python openrlhf_driver.py URLS_JSON SAMPLES_JSON  ->  one JSON answer per sample on stdout
"""

import asyncio
import importlib.util
import json
import sys
import types
from pathlib import Path


def load_agent():
    spec = importlib.util.find_spec("openrlhf")
    root = Path(spec.submodule_search_locations[0])
    for name, path in (("openrlhf", root), ("openrlhf.utils", root / "utils")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    for mod in ("logging_utils", "agent"):
        full = f"openrlhf.utils.{mod}"
        s = importlib.util.spec_from_file_location(full, root / "utils" / f"{mod}.py")
        m = importlib.util.module_from_spec(s)
        sys.modules[full] = m
        s.loader.exec_module(m)
    return sys.modules["openrlhf.utils.agent"]


async def main(urls, samples):
    agent = load_agent()
    executor = agent.SingleTurnAgentExecutor(urls)  # train_ppo_ray splits the flag on ","

    async def one(s):
        (info,) = await executor._fetch_rewards_via_http([s["query"]], [s["prompt"]], [s["label"]])
        return info

    return await asyncio.gather(*(one(s) for s in samples))


if __name__ == "__main__":
    urls = json.loads(sys.argv[1])
    samples = json.loads(Path(sys.argv[2]).read_text())
    print(json.dumps(asyncio.run(main(urls, samples))))
