"""Plug-ins used by tests through import paths, as users would write them."""


def exploding_reward(sample):
    raise RuntimeError("reward exploded")


async def two_turn_agent(base_url, api_key, task):
    """Asks, then asks again with a follow-up user turn: a multi-turn session through the gateway."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages = [{"role": "user", "content": task["prompt"]}]
    r = await client.chat.completions.create(model="vime", messages=messages, max_tokens=4, seed=len(base_url))
    messages += [
        {"role": "assistant", "content": r.choices[0].message.content},
        {"role": "user", "content": "final answer?"},
    ]
    r = await client.chat.completions.create(model="vime", messages=messages, max_tokens=4)
    await client.close()
    return r.choices[0].message.content
