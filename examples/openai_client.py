"""Talk to `examples/serve_vllm.sh` with the OpenAI client: chat, streaming, concurrency.

    pip install openai            # the client; dgplug does not install it
    python examples/openai_client.py [--base-url http://localhost:8000/v1] [--concurrency 8]

DiffusionGemma writes a whole 256-token canvas per block, so a stream arrives in canvas-sized
chunks. vLLM's diffusion options travel as `vllm_xargs` (e.g. a cap on denoising steps).
"""

from __future__ import annotations

import argparse
import asyncio
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://localhost:8000/v1")
    ap.add_argument("--model", default="diffusiongemma")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=512)
    args = ap.parse_args()

    try:
        from openai import APIConnectionError, AsyncOpenAI, OpenAI
    except ImportError:
        raise SystemExit("openai_client.py needs the OpenAI client: pip install openai") from None

    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    try:
        client.models.list()
    except APIConnectionError:
        raise SystemExit(f"no server at {args.base_url}: start one with examples/serve_vllm.sh MODEL_DIR "
                         "(or give --base-url)") from None
    messages = [{"role": "user", "content": "Explain block diffusion language models in three sentences."}]

    # 1. one chat completion
    r = client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                       extra_body={"vllm_xargs": {"diffusion_max_steps": 48}})
    print(r.choices[0].message.content, "\n", r.usage)

    # 2. streaming: text arrives a committed canvas at a time
    for chunk in client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    # 3. N concurrent requests (dgplug's fused sampler keeps 8+ in memory)
    async def many():
        aclient = AsyncOpenAI(base_url=args.base_url, api_key="EMPTY")
        t = time.perf_counter()
        rs = await asyncio.gather(*[
            aclient.chat.completions.create(model=args.model, max_tokens=args.max_tokens,
                                            messages=[{"role": "user", "content": f"Write a haiku about the number {i}."}])
            for i in range(args.concurrency)])
        dt = time.perf_counter() - t
        toks = sum(x.usage.completion_tokens for x in rs)
        print(f"{args.concurrency} concurrent requests: {toks} tokens in {dt:.1f} s ({toks / dt:.0f} tok/s)")

    asyncio.run(many())


if __name__ == "__main__":
    main()
