"""Real agent frameworks, unchanged, through the gateway in front of the shared real vLLM-CPU engines: the OpenAI
Agents SDK (its default Responses API, and Chat Completions), LangGraph and litellm, each through a tool loop. The
tiny random model would never choose a tool, so the first turn names the tool in `tool_choice` (one call), which
the gateway honours with the engine's structured output; the next turn is the model's own. Each test then checks
the recorded session: one branch, every turn's ids exactly as sampled, mask 1 on exactly the sampled ids (the
tool result is context)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Literal

import pytest
from conftest import branch_is_exact
from transformers import AutoTokenizer

from vime.gateway.config import GatewayConfig
from vime.gateway.server import Gateway

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of litellm's price list (offline)
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")

pytestmark = pytest.mark.slow
KEY = "fw-key"
CALLS: list[str] = []


def capital(country: Literal["france", "italy"]) -> str:
    """The capital of a country."""
    CALLS.append(country)
    return {"france": "Paris", "italy": "Rome"}[country]


# the arguments are an enum: a forced call by the random model is short whatever it samples (an integer argument
# can run on for dozens of digit tokens and be cut by max_tokens)
CAPITAL_TOOL = {
    "type": "function",
    "function": {
        "name": "capital",
        "description": "The capital of a country.",
        "parameters": {
            "type": "object",
            "properties": {"country": {"type": "string", "enum": ["france", "italy"]}},
            "required": ["country"],
        },
    },
}


@pytest.fixture(scope="module")
def gw(qwen2_engines, model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir("qwen2"))
    with Gateway(qwen2_engines, tok, GatewayConfig(api_key=KEY, model_name="tiny", context_length=2048)) as g:
        yield g


def recorded(gw, sid, turns):
    """The session the framework left: one branch of `turns` turns, exact, with the tool's answer in it."""
    s = gw.store.sessions[sid]
    assert len(s.branches) == 1 and len(s.turns) == turns, [len(b.turns) for b in s.branches]
    branch_is_exact(s.branches[0])
    assert 0 in s.branches[0].mask[s.branches[0].prompt_len :]  # the tool result between the turns: context
    return s


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_openai_agents_sdk_tool_loop(gw, api):
    from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
    from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
    from agents.models.openai_responses import OpenAIResponsesModel
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    sid = f"agents-{api}"
    client = AsyncOpenAI(base_url=gw.session_url(sid), api_key=KEY, max_retries=0)
    model_cls = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
    agent = Agent(
        name="calculator",
        instructions="Use the capital tool.",
        tools=[function_tool(capital)],
        model=model_cls(model="tiny", openai_client=client),
        # forced on the first turn only: the SDK resets tool_choice after a tool call (reset_tool_choice); the
        # final answer is structured output (the random model would otherwise write until max_tokens, which the
        # SDK's Responses path treats as an error)
        model_settings=ModelSettings(tool_choice="capital", max_tokens=120, temperature=1.0),
        output_type=bool,
    )
    CALLS.clear()
    result = asyncio.run(Runner.run(agent, "What is the capital of France?", max_turns=2))
    assert len(CALLS) == 1 and isinstance(result.final_output, bool), (CALLS, result)
    recorded(gw, sid, 2)


def test_langgraph_tool_loop(gw):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    sid = "langgraph"
    tools = [tool(capital)]
    llm = ChatOpenAI(model="tiny", base_url=gw.session_url(sid), api_key=KEY, max_tokens=120, max_retries=0)

    def model(state: MessagesState) -> dict:
        first = not any(isinstance(m, ToolMessage) for m in state["messages"])
        bound = llm.bind_tools(tools, tool_choice="capital" if first else "auto")
        return {"messages": [bound.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    CALLS.clear()
    out = graph.compile().invoke({"messages": [HumanMessage("What is the capital of France?")]}, {"recursion_limit": 6})
    assert len(CALLS) >= 1 and isinstance(out["messages"][2], ToolMessage), out["messages"]
    recorded(gw, sid, len([m for m in out["messages"] if m.type == "ai"]))


def test_litellm_tool_loop(gw):
    import litellm

    sid = "litellm"
    kw = {"model": "openai/tiny", "api_base": gw.session_url(sid), "api_key": KEY, "max_tokens": 120}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    named = {"type": "function", "function": {"name": "capital"}}
    first = litellm.completion(messages=messages, tools=[CAPITAL_TOOL], tool_choice=named, **kw)
    msg = first.choices[0].message
    (call,) = msg.tool_calls[:1]
    args = json.loads(call.function.arguments)
    messages += [
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": capital(args["country"])},
    ]
    second = litellm.completion(messages=messages, tools=[CAPITAL_TOOL], **kw)
    assert first.choices[0].finish_reason == "tool_calls" and args["country"] in ("france", "italy"), first
    assert second.choices[0].message is not None
    recorded(gw, sid, 2)
