"""Request and response bodies of the OpenAI-compatible API.

Top-level request fields the server does not know are ignored (clients send
many optional OpenAI fields); fields it knows but cannot honour (``n`` > 1,
``logprobs``, penalties) are rejected with a message naming the field. The
``steer`` items are strict (``extra="forbid"``): a typo there must not
silently run an unsteered model.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from steerlab.errors import SteerlabError

MAX_STEER_ITEMS = 16
MAX_STOP = 4
MAX_STOP_CHARS = 256


class RequestError(SteerlabError):
    """A request the server refuses; ``param`` names the offending field."""

    def __init__(self, param: str | None, message: str, status: int = 422,
                 code: str = "invalid_request") -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param
        self.message = message
        self.status = status
        self.code = code


def _unicode(value: str) -> str:
    """Refuse text that is not valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"``)
    before any tokenizer sees it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text has an unpaired UTF-16 surrogate at character {exc.start}; "
                         "send valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
"""Sampling seeds: any 64-bit integer (the engine hashes it with the prompt index)."""
Alpha = Annotated[float, Field(allow_inf_nan=False, ge=-1e4, le=1e4)]
Layers = (Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1024)]
          | Annotated[int, Field(ge=0)] | Annotated[Text, Field(max_length=256)])
"""Layer indices, one index, ``"all"``, ``"12-18"`` or ``"3,5-7"`` (checked against the model)."""
Name = Annotated[Text, Field(min_length=1, max_length=128)]


class _StrictItem(BaseModel):
    model_config = ConfigDict(extra="forbid")


Positions = Literal["all", "prompt", "generated"]
Site = Literal["input", "attn", "mlp", "output"]
Sites = Annotated[list[Site], Field(min_length=1, max_length=4)]
SourceLayer = Annotated[int, Field(ge=0)] | None


class SteerAdd(_StrictItem):
    """Add ``alpha`` times the direction to the output of each layer in ``layers``."""

    op: Literal["add"]
    direction: Name
    alpha: Alpha
    layers: Layers = "all"
    positions: Positions = "all"
    source_layer: SourceLayer = None
    scale: Literal["raw", "unit", "mean_norm"] = "raw"


class SteerAblate(_StrictItem):
    """Project the direction out at every hooked site of ``layers``."""

    op: Literal["ablate"]
    direction: Name
    layers: Layers = "all"
    positions: Positions = "all"
    source_layer: SourceLayer = None
    sites: Sites | None = None


class SteerProject(_StrictItem):
    """Project the direction out of the outputs of the layers in ``layers`` only."""

    op: Literal["project"]
    direction: Name
    layers: Layers = "all"
    positions: Positions = "all"
    source_layer: SourceLayer = None


class SteerSubspace(_StrictItem):
    """Project out the subspace spanned by several registered directions at ``layers``."""

    op: Literal["subspace", "subspace_ablate"]
    directions: Annotated[list[Name], Field(min_length=1, max_length=MAX_STEER_ITEMS)]
    layers: Layers = "all"
    positions: Positions = "all"
    source_layers: Layers | None = None
    sites: Sites | None = None


Weight = Annotated[float, Field(allow_inf_nan=False, ge=-1e4, le=1e4)]
KernelParams = Annotated[list[Weight], Field(min_length=3, max_length=4)]


class SteerKernelAblate(_StrictItem):
    """Ablate with per-layer weights from two kernels (what ``steerlab abliterate`` writes):
    ``attn`` and ``mlp`` are ``[peak, center, width, floor]``."""

    op: Literal["kernel_ablate"]
    direction: Name
    source: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    attn: KernelParams
    mlp: KernelParams
    rank: Annotated[int, Field(ge=1, le=64)] = 1
    positions: Positions = "all"


SteerItem = Annotated[
    SteerAdd | SteerAblate | SteerProject | SteerSubspace | SteerKernelAblate,
    Field(discriminator="op")
]
"""One steering operation. ``direction`` is a name registered at startup, or
``random_like(NAME, SEED[, orthogonal])`` for a norm-matched random control."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    n: Annotated[int, Field(ge=1, le=1, description="Only n=1 is supported.")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    ignore_eos: bool = Field(False, description="steerlab extension: generate exactly max_tokens.")
    steer: Annotated[list[SteerItem], Field(max_length=MAX_STEER_ITEMS)] | None = Field(
        None,
        description="steerlab extension: steering for this request, by registered direction "
        "name; omitted = the server's default steering, [] = no steering.",
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        for s in stops:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties are not supported by steerlab serve; leave it at 0")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported by steerlab serve")
        return None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=512)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=64)]
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None


# -- responses ----------------------------------------------------------------------------------
ChoiceT = TypeVar("ChoiceT", bound=BaseModel)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class _Response(BaseModel, Generic[ChoiceT]):
    """The envelope of every completion response, in OpenAI's field order; each response
    names its ``object`` (and the chat completion requires ``usage``)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatCompletion(_Response[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response[ChatChunkChoice]):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(_Response[TextChoice]):
    object: Literal["text_completion"] = "text_completion"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "steerlab"
    directions: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
