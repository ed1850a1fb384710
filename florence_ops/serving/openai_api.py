"""The OpenAI chat-completions shapes the server speaks, as typed models, and how a request becomes a question.

A request carries one user message with a text part (the question) and an `image_url` part (the page, as a `data:`
URL, or an http(s) URL where `serve.allow_remote_images` is on). Other OpenAI fields (temperature, max_tokens, ...)
are accepted and ignored: decoding is the model's own, as evaluation scored it. A question with more tokens than the
model was trained on is refused (`question_too_long`), as predict refuses it. Errors use OpenAI's error body.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from florence_ops.data.validation import Problem


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions body; unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    messages: list[Message] = Field(min_length=1)
    n: int = 1
    stream: bool = False


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = "stop"
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None  # the served model's version (changes when a new model is swapped in)
    choices: list[Choice]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


UNAUTHORIZED = "missing or wrong bearer token (Authorization: Bearer <token>)"


class BadRequest(Exception):
    """A request the server refuses; becomes an OpenAI error body with `status`."""

    def __init__(self, message: str, code: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.code, self.param, self.status = message, code, param, status

    def body(self) -> dict:
        """The OpenAI error object."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return ErrorResponse(error=ErrorDetail(message=self.message, type=kind, param=self.param, code=self.code))


def refuse(problem: Problem | None, param: str | None = None) -> None:
    """Raise a `problem` found by the checks predict also applies as a 400 whose code is its reason; None passes."""
    if problem is not None:
        raise BadRequest(f"{problem.reason}: {problem.detail}", problem.reason, param)


def question_and_image(request: ChatCompletionRequest) -> tuple[str, str]:
    """The question text and the image URL of the request's last user message; BadRequest when it has not one each."""
    if request.n != 1:
        raise BadRequest("n must be 1: the model gives one answer per question", "unsupported_parameter", "n")
    if request.stream:
        raise BadRequest("stream is not supported: answers are a few tokens", "unsupported_parameter", "stream")
    users = [i for i, message in enumerate(request.messages) if message.role == "user"]
    if not users:
        raise BadRequest("messages hold no user message", "invalid_message", "messages")
    index = users[-1]
    content = request.messages[index].content
    param = f"messages[{index}].content"
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content or []
    question = " ".join(p.text.strip() for p in parts if isinstance(p, TextPart) and p.text.strip())
    images = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
    if len(images) != 1:
        raise BadRequest(f"the user message must hold one image_url part (the page), found {len(images)}",
                         "invalid_message", param)  # fmt: skip
    if not question:
        raise BadRequest("the question is empty: add a text part to the user message", "question_empty", param)
    return question, images[0]


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL; BadRequest when it is malformed."""
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        raise BadRequest("image_url must be a base64 data: URL (data:image/png;base64,...)", "invalid_image_url",
                         "image_url")  # fmt: skip
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image_url's base64 data is malformed", "invalid_image_url", "image_url") from None
