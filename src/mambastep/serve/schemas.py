"""The server's requests and responses, as pydantic models: ``/openapi.json`` describes them
exactly, and a request with an unknown field, a wrong type or a number out of range is
refused before anything runs (400)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
MinP = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
StopText = Annotated[str, Field(min_length=1, max_length=256)]
FinishReason = Literal["stop", "length", "cancelled", "error"]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(Request):
    """How tokens are chosen, and when a generation stops."""

    max_tokens: int = Field(16, ge=1, description="tokens to generate at most (an eos token counts)")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="0: off")
    min_p: MinP = 0.0
    repetition_penalty: Penalty = 1.0
    seed: Seed | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=16)] | None = None
    stream: bool = Field(False, description="server-sent events, ending with `data: [DONE]`")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probabilities, with this many alternatives")
    ignore_eos: bool = False


class StreamOptions(Request):
    include_usage: bool = False


class CompletionRequest(Sampling):
    """OpenAI's completion request, with ``session`` and ``session_commit`` as extensions."""

    model: str | None = None
    prompt: (
        str
        | list[TokenId]
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[list[TokenId]], Field(min_length=1)]
    )
    echo: bool = False
    n: int = Field(1, ge=1)
    user: str | None = Field(None, max_length=256)
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = Field(0.0, description="only 0 is supported")
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = Field(0.0, description="only 0 is supported")
    session: str | None = Field(None, max_length=64, description="read the prompt into this session and continue it")
    session_commit: bool = Field(True, description="read the completion into the session too")


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Input(Request):
    """One input: text (through the tokenizer), token ids, or base64 bytes (each byte a token id)."""

    text: str | None = Field(None, description="text, through the model's tokenizer")
    tokens: list[TokenId] | None = None
    bytes: str | None = Field(None, description="base64; each byte is a token id (byte-level models)")


class SessionCreate(Request):
    prompt: str | None = Field(None, description="text to read first")
    tokens: list[TokenId] | None = Field(None, description="token ids to read first")


class SessionObject(BaseModel):
    id: str
    object: Literal["session"] = "session"
    position: int = Field(description="tokens read so far")
    state_bytes: int = Field(description="bytes of the state: the same at any position")
    file_bytes: int = Field(description="bytes of the session file")
    version: int
    created: float
    updated: float


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionObject]
    total: int
    offset: int
    limit: int


class Deleted(BaseModel):
    id: str
    object: Literal["session"] = "session"
    deleted: bool = True


class GenerateRequest(Sampling):
    commit: bool = Field(True, description="read what was generated into the session")


class GenerateResponse(BaseModel):
    session: SessionObject
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    logprobs: Logprobs | None = None


class Checkpoint(BaseModel):
    id: int
    object: Literal["checkpoint"] = "checkpoint"
    session: str
    position: int


class RollbackRequest(Request):
    checkpoint: int | None = Field(None, ge=0, le=2**63 - 1, description="a checkpoint of this session")
    tokens: int | None = Field(None, ge=0, le=2**31 - 1, description="undo the last this many tokens")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mambastep"
    family: str
    parameters: int
    state_bytes: int = Field(description="bytes of one sequence's state, whatever its length")
    transformer_kv_bytes_per_token: int = Field(
        description="what a transformer of the same width and depth adds to its KV cache per token"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "store_unavailable"]
    model: str | None = None
    reason: str | None = Field(None, description="why the store cannot be reached (status store_unavailable)")


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
