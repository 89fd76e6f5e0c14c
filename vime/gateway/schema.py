"""The gateway's wire format: OpenAI request bodies as pydantic models, and errors in OpenAI's error shape (a
client library shows `message` and `param`, so they name the field to fix)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=128)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    stream: bool = False
    user: str | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What the chat template cannot render sensibly is refused here, naming the message (a template would
        otherwise render a role it does not know as text, and the model would be trained on it)."""
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {role!r})")
            content = m.get("content")
            if content is None and not (role == "assistant" and m.get("tool_calls")):
                raise ValueError(f"messages[{i}] ({role}) has no content")
            if content is not None and not isinstance(content, str | list):
                raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        return [
            {**m, "content": text_of(m["content"], i)} if isinstance(m.get("content"), list) else m for m in messages
        ]


def text_of(parts: list[Any], i: int) -> str:
    """OpenAI's content parts → the text the chat template renders. Without this a template given a list renders
    its Python repr (`[{'type': 'text', ...}]`) into the prompt, and the model is trained on that."""
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "input_text", "output_text") or not isinstance(part.get("text"), str):
            raise ValueError(f"messages[{i}].content[{j}] is a {kind!r} part; this gateway takes text parts only")
        out.append(part["text"])
    return "".join(out)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    n: int = Field(default=1, ge=1, le=128)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=16, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(default=None, ge=0, le=0)
    stream: bool = False
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, p: str | list[int] | list[str] | list[list[int]]) -> Any:
        if not p or (isinstance(p, list) and any(not x for x in p if isinstance(x, str | list))):
            raise ValueError("prompt is empty")
        return p


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(
        status_code=e.status,
        content={"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
    )


def parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"invalid field '{field}': {err['msg']}", param=field) from None
